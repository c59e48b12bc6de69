from setuptools import setup

# torch>=2.7: the newest of the arguments the code passes to torch. Evidence (2026-12-01):
# - `decoupled_weight_decay=` of the functional `torch.optim.adam.adam` (asft_optim/optimizer.py,
#   functional.py), and `torch.optim.AdamW` as a subclass of `Adam` whose `_init_group` AsFTAdamW calls:
#   pytorch/pytorch#143710, merged January 2025 (its follow-up #144984 of 2025-01-16; Lightning-AI/
#   pytorch-lightning#20574 of 2025-02-05 adapted a test to it on torch nightly). The 2.6 release
#   branch was cut on 2024-12-10 (pytorch/pytorch#142814) and 2.6.0 shipped on 2025-01-29 without
#   it, so 2.7.0 is the first release with it.
# - `param_names` in param groups (named parameters): pytorch/pytorch#134107, 2024, in 2.6.
# - `torch.distributed.tensor` (DTensor, Shard, Replicate, `_utils.compute_local_shape_and_global_offset`)
#   as a public module: pytorch/pytorch#133881 of 2024-08-19, in 2.5.
# - `fused=True` of Adam/AdamW on CPU: pytorch/pytorch#123074, April 2024, in 2.4 (2.3 was CUDA only).
# - `torch.distributed.checkpoint` `get_state_dict`/`set_state_dict` and `dcp.save/load(no_dist=)`:
#   older than all of these.

setup(
    name="asft_optim",
    version="0.1.0",
    description="AsFT (Anchoring Safety in Fine-Tuning) as a drop-in AdamW optimizer for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["asft_optim", "asft_optim.kernels", "asft_optim.demo", "asft_optim.evaluation",
              "asft_optim.finetune", "asft_optim.integrations", "asft_optim.native"],
    package_data={"asft_optim.native": ["*.cpp"]},
    package_dir={"asft_optim": "asft_optim", "asft_optim.kernels": "kernels"},
    # numpy: safetensors hands tensors to torch through numpy (Anchors.load, asft directions);
    # ninja, filelock: the native CPU kernel is compiled on first use (asft_optim/native/build.py)
    install_requires=["torch>=2.7", "safetensors>=0.4", "numpy>=1.24", "tqdm>=4.60", "ninja>=1.10",
                      "filelock>=3.0"],
    extras_require={
        "triton": ["triton>=3.1"],
        "hf": ["transformers>=4.56", "peft>=0.13", "accelerate>=1.0", "huggingface_hub>=0.24"],
        "plot": ["matplotlib>=3.7"],
        "eval": ["datasets>=2.14"],
        "deepspeed": ["deepspeed>=0.19"],
        "test": ["pytest>=8", "hypothesis>=6.100", "trl>=0.20"],
        "bench": ["pytest-benchmark>=4", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["asft=asft_optim.cli:main"]},
)
