from setuptools import setup

setup(
    name="asft_optim",
    version="0.1.0",
    description="AsFT (Anchoring Safety in Fine-Tuning) as a drop-in AdamW optimizer for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["asft_optim", "asft_optim.kernels", "asft_optim.demo", "asft_optim.integrations"],
    package_dir={"asft_optim": "asft_optim", "asft_optim.kernels": "kernels"},
    install_requires=["torch>=2.6", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.1"],
        "hf": ["transformers>=4.56", "peft>=0.13", "accelerate>=1.0", "huggingface_hub>=0.24"],
        "plot": ["matplotlib>=3.7"],
        "deepspeed": ["deepspeed>=0.19"],
        "test": ["pytest>=8", "hypothesis>=6.100", "numpy>=1.24"],
        "bench": ["pytest-benchmark>=4", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["asft=asft_optim.cli:main"]},
)
