"""Worker for the DeepSpeed ZeRO tests:
`python -m torch.distributed.run --nproc_per_node=2 zero_worker.py MODES OUT_DIR`.

Modes (gloo, CPU, world size 2; each runs several DeepSpeed engines one after the other):
  train   ZeRO-1, 2 and 3, fp32 and bf16, with torch.optim.AdamW (the harness's baseline) and with
          AsFTAdamW, against single-process runs; all-reduces of each optimizer step counted by
          caller; drift on both ranks; a negative control (the dot all-reduce skipped).
  ckpt    ZeRO-2 and 3: engine.save_checkpoint after 4 steps, load_checkpoint into a fresh engine
          (other initial weights), 4 more steps against the uninterrupted run; resumes with other
          λ or anchors refused; config checks; ZeRO-Offload to the CPU.
  trainer AsFTTrainer with a DeepSpeed config dict (ZeRO-2, then ZeRO-3) against a single-process
          loop over the batches each rank saw; drift logs of both ranks; ZeRO-2 resumed by the
          Trainer from its step-4 checkpoint; a config with an "optimizer" section refused.
MODES is one mode or several, comma-separated (one launch). Rank 0 writes OUT_DIR/MODES.json
({mode: what it measured}); the pytest file asserts on it.

The model's tensors have 30, 5, 15, 3, 3 and 1 elements, in three param groups: ZeRO-1/2 split
a.weight (weights: 48 elements, 24/24) and b.bias (a.bias and b.bias: 8, 4/4) across the ranks,
and rank 1's partition of c.bias's group is all padding; ZeRO-3 splits every tensor unevenly
(c.bias lies wholly on rank 0).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

import asft_optim.zero as asft_zero
from asft_optim import Anchors, AsFTAdamW

from worker import finish

STEPS = 8
LR = 2e-2
LAM = 1.0
BATCH = 8  # per rank


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def directions(seed: int = 1234) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=gen) for n, p in make_model().named_parameters()}
    d["c.bias"].zero_()  # a zero direction: a plain L2 pull
    return d


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s half of step `step`'s global batch."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2 * BATCH, 6, generator=gen)
    y = torch.randn(2 * BATCH, 1, generator=gen)
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def groups(model: nn.Module, named: bool = True) -> list[dict]:
    """Weights; a.bias and b.bias; c.bias alone (1 element: under ZeRO-1/2 rank 1's partition of
    that group is all padding)."""
    items = [((n, p) if named else p, n) for n, p in model.named_parameters()]

    def pick(keep: Callable[[str], bool]) -> list:
        return [x for x, n in items if keep(n)]

    return [{"params": pick(lambda n: n.endswith("weight"))},
            {"params": pick(lambda n: n in ("a.bias", "b.bias")), "weight_decay": 0.0},
            {"params": pick(lambda n: n == "c.bias"), "weight_decay": 0.0}]


def asft(model: nn.Module, anchors: Anchors, lam: float = LAM) -> AsFTAdamW:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero direction of c.bias warns
        return AsFTAdamW(groups(model), lr=LR, anchors=anchors, asft_lambda=lam)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups(model, named=False), lr=LR)


def config(stage: int, bf16: bool = False, **extra: Any) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "bf16": {"enabled": bf16},
            **extra}


def dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


class CallCounter:
    """Counts `torch.distributed.all_reduce` calls made from `asft_optim` modules, per step."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def __enter__(self) -> CallCounter:
        self.real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("asft_optim"):
                self.calls.append((tensor.numel(), str(tensor.dtype)))
            return self.real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self.real


def train(engine: Any, rank: int, steps: range, bf16: bool = False,
          on_step: Callable[[int], None] | None = None) -> list[list[tuple[int, str]]]:
    """Steps of a DeepSpeed engine; returns per step the asft all-reduces of `engine.step()`."""
    comms = []
    for step in steps:
        x, y = batch(step, rank)
        loss = (engine(x.to(dtype(bf16))) - y.to(dtype(bf16))).square().mean()
        engine.backward(loss)
        with CallCounter() as counter:
            engine.step()
        comms.append(counter.calls)
        if on_step is not None:
            on_step(step + 1)
    return comms


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weights by name, gathered by DeepSpeed (collective)."""
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters()}


def reference(make_opt: Callable[[nn.Module], torch.optim.Optimizer], bf16: bool,
              steps: int = STEPS) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The single-process run. fp32: the gradient is g0/2 + g1/2 of the two halves. bf16 (as
    DeepSpeed does it): fp32 masters start as the bf16-rounded initial weights, each half's forward
    and backward run on a bf16 copy of the masters, and the gradient is their bf16 mean."""
    master = make_model()
    lp = make_model().to(dtype(bf16))
    with torch.no_grad():
        for p in master.parameters():
            p.copy_(p.to(dtype(bf16)).float())
    opt = make_opt(master)
    for step in range(steps):
        with torch.no_grad():
            for q, p in zip(lp.parameters(), master.parameters()):
                q.copy_(p)
        halves = []
        for r in range(2):
            lp.zero_grad()
            x, y = batch(step, r)
            (lp(x.to(dtype(bf16))) - y.to(dtype(bf16))).square().mean().backward()
            halves.append([q.grad.clone() for q in lp.parameters()])
        for p, g0, g1 in zip(master.parameters(), *halves):
            p.grad = (g0 / 2 + g1 / 2).float()
        opt.step()
    return master, opt


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def run_engine(stage: int, bf16: bool, make_opt: Callable[[nn.Module], torch.optim.Optimizer], rank: int,
               seed: int = 0, **extra: Any) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    model = make_model(seed)
    opt = make_opt(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, bf16, **extra))
    return model, engine, opt


def run_train(out: Path, rank: int) -> dict:
    anchors = Anchors.from_tensors(directions())
    result: dict[str, Any] = {}
    for bf16 in (False, True):
        ref_adamw = {n: p.detach() for n, p in reference(adamw, bf16)[0].named_parameters()}
        ref_model, ref_opt = reference(lambda m: asft(m, anchors), bf16)
        ref = {n: p.detach() for n, p in ref_model.named_parameters()}
        ref_drift = {n: d.as_dict() for n, d in ref_opt.drift().items()}
        plain = {n: p.detach() for n, p in reference(lambda m: asft(m, anchors, lam=0.0), bf16)[0].named_parameters()}
        for stage in (1, 2, 3):
            tag = f"zero{stage}_{'bf16' if bf16 else 'fp32'}"
            model, engine, _ = run_engine(stage, bf16, adamw, rank)
            train(engine, rank, range(STEPS), bf16)
            result[f"{tag}/adamw_max_rel"] = max_rel(full_params(model), ref_adamw)
            engine.destroy()
            model, engine, opt = run_engine(stage, bf16, lambda m: asft(m, anchors), rank)
            comms = train(engine, rank, range(STEPS), bf16)
            result[f"{tag}/max_rel"] = max_rel(full_params(model), ref)
            drift = {n: d.as_dict() for n, d in opt.drift().items()}  # collective
            drifts: list = [None, None]
            dist.all_gather_object(drifts, drift)
            result[f"{tag}/drift_max_diff"] = max(abs(dr[n][k] - ref_drift[n][k]) for dr in drifts
                                                  for n in ref_drift for k in ref_drift[n])
            result[f"{tag}/drift_names"] = [sorted(dr) for dr in drifts]
            result[f"{tag}/comms"] = comms
            engine.destroy()
        result[f"{'bf16' if bf16 else 'fp32'}/penalty_effect"] = max_rel(ref, plain)
        if bf16:  # ZeRO-1 + bf16 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer wraps the client
            model, engine, _ = run_engine(1, True, lambda m: asft(m, anchors), rank,
                                          data_types={"grad_accum_dtype": "fp32"})
            result["bf16_optimizer/wrapper"] = type(engine.optimizer).__name__
            result["bf16_optimizer/comms"] = train(engine, rank, range(STEPS), True)
            result["bf16_optimizer/max_rel"] = max_rel(full_params(model), ref)
            engine.destroy()
        if not bf16:  # ZeRO-3 with the model built under zero.Init: partitioned before the optimizer
            with deepspeed.zero.Init(config_dict_or_path=config(3)):
                model = make_model()
            opt = asft(model, anchors)
            result["zero_init/kinds"] = sorted({b.kind.value for b in opt.records.bindings.values()})
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(3))
            train(engine, rank, range(STEPS))
            result["zero_init/max_rel"] = max_rel(full_params(model), ref)
            engine.destroy()
            # ZeRO-3 sub-groups of about 8 elements per rank: five partitions, one step() call each.
            model = make_model()
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=asft(model, anchors), config=config(
                3, zero_optimization={"stage": 3, "sub_group_size": 8}))
            result["subgroups/partitions"] = len(engine.optimizer.fp16_groups)
            result["subgroups/comms"] = train(engine, rank, range(STEPS))
            result["subgroups/max_rel"] = max_rel(full_params(model), ref)
            engine.destroy()
    # Negative control: ZeRO-2 with each rank's partial dots taken as the global ones (the fp32
    # all-reduce of dots skipped; the binding's fp64 ones kept).
    real = asft_zero.ZeroTensors._all_reduce

    def no_dot_reduction(self, vec, op):
        if vec.dtype != torch.float32:
            real(self, vec, op)

    asft_zero.ZeroTensors._all_reduce = no_dot_reduction  # type: ignore[method-assign]
    try:
        model, engine, _ = run_engine(2, False, lambda m: asft(m, anchors), rank)
        train(engine, rank, range(STEPS))
    finally:
        asft_zero.ZeroTensors._all_reduce = real  # type: ignore[method-assign]
    fp32_ref = {n: p.detach() for n, p in reference(lambda m: asft(m, anchors), False)[0].named_parameters()}
    result["unreduced_max_rel"] = max_rel(full_params(model), fp32_ref)
    engine.destroy()
    return result


def run_ckpt(out: Path, rank: int) -> dict:
    anchors = Anchors.from_tensors(directions())
    other = Anchors.from_tensors(directions(seed=99))
    result: dict[str, Any] = {}
    for stage in (2, 3):
        folder = out / f"ckpt{stage}"
        model, engine, opt = run_engine(stage, False, lambda m: asft(m, anchors), rank)
        train(engine, rank, range(STEPS), on_step=lambda step, engine=engine, folder=folder: (
            step == STEPS // 2 and engine.save_checkpoint(str(folder), tag="half")))
        uninterrupted = full_params(model)
        engine.destroy()
        model, engine, opt = run_engine(stage, False, lambda m: asft(m, anchors), rank, seed=7)
        engine.load_checkpoint(str(folder), tag="half")
        comms = train(engine, rank, range(STEPS // 2, STEPS))
        resumed = full_params(model)
        result[f"zero{stage}/resumed_max_abs"] = max(float((resumed[n] - uninterrupted[n]).abs().max())
                                                     for n in uninterrupted)
        result[f"zero{stage}/resumed_comms"] = comms
        engine.destroy()
        for what, make in (("lambda", lambda m: asft(m, anchors, lam=2.0)), ("anchors", lambda m: asft(m, other))):
            model, engine, opt = run_engine(stage, False, make, rank, seed=7)
            try:
                engine.load_checkpoint(str(folder), tag="half")
                result[f"zero{stage}/{what}_error"] = ""
            except ValueError as e:
                result[f"zero{stage}/{what}_error"] = str(e)
            engine.destroy()
        if rank == 0:  # what DeepSpeed stored for the client optimizer
            saved = torch.load(folder / "half" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
            sd = saved["optimizer_state_dict"]
            client = sd["base_optimizer_state"] if stage < 3 else sd["optimizer_state_dict"]
            result[f"zero{stage}/saved_group_keys"] = sorted(client["param_groups"][0])
            result[f"zero{stage}/saved_state_keys"] = sorted(client["state"][0])
            result[f"zero{stage}/saved_w0_numel"] = client["state"][0]["w0"].numel()
    errors = {}
    for name, cfg in (("untested", {"zero_optimization": {"stage": 2}}),
                      ("offload", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                   "zero_allow_untested_optimizer": True})):
        try:
            asft_zero.initialize(model=make_model(), optimizer=asft(make_model(), anchors),
                                 config={"train_micro_batch_size_per_gpu": BATCH, **cfg})
            errors[name] = ""
        except ValueError as e:
            errors[name] = str(e)
    result["config_errors"] = errors
    # ZeRO-Offload with "zero_force_ds_cpu_optimizer": false: AsFTAdamW steps the CPU partitions.
    ref = {n: p.detach() for n, p in reference(lambda m: asft(m, anchors), False)[0].named_parameters()}
    model = make_model()
    engine, _, _, _ = asft_zero.initialize(model=model, optimizer=asft(model, anchors), config=config(
        2, zero_force_ds_cpu_optimizer=False, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    train(engine, rank, range(STEPS))
    result["offload/max_rel"] = max_rel(full_params(model), ref)
    engine.destroy()
    return result


class Regressor(nn.Module):
    """`Net` with the loss inside, as a Trainer model; records the batches it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_model(seed)
        self.seen: list[tuple[list, list]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            self.seen.append((x.tolist(), y.tolist()))
        return {"loss": (self.net(x) - y).square().mean()}


class Logs:
    """A TrainerCallback-like recorder of every log (on every rank)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def on_log(inner, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))

        self.logs: list[dict] = []
        self.callback = Recorder()


def run_trainer(out: Path, rank: int) -> dict:
    """AsFTTrainer with a DeepSpeed config dict (ZeRO-2, then ZeRO-3), 2 ranks × 4 samples per step,
    against a single-process AsFTAdamW loop over the batches each rank saw."""
    from transformers import TrainingArguments

    from asft_optim.integrations import AsFTTrainer

    gen = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(64, 6, generator=gen), torch.randn(64, 1, generator=gen)
    data = [{"x": x, "y": y} for x, y in zip(xs, ys)]
    anchors = Anchors.from_tensors({f"net.{n}": d for n, d in directions().items()})
    result: dict[str, Any] = {}
    def trainer_args(stage: int) -> TrainingArguments:  # a fresh one per Trainer (accelerate's rule)
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage}}
        return TrainingArguments(output_dir=str(out / f"trainer{stage}"), per_device_train_batch_size=4,
                                 max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                                 weight_decay=0.01, max_grad_norm=0.0, logging_steps=STEPS // 2,
                                 save_strategy="steps" if stage == 2 else "no", save_steps=STEPS // 2,
                                 report_to=[], disable_tqdm=True, deepspeed=ds, seed=0)

    for stage in (2, 3):
        args = trainer_args(stage)
        model = Regressor()
        logs = Logs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = AsFTTrainer(model=model, args=args, train_dataset=data, anchors=anchors,
                                  asft_lambda=LAM, callbacks=[logs.callback])
            trainer.train()
        params = full_params(model)
        if stage == 2:  # Trainer's resume from its DeepSpeed checkpoint, into other initial weights
            resumed_model = Regressor(seed=7)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resumed = AsFTTrainer(model=resumed_model, args=trainer_args(2), train_dataset=data,
                                      anchors=anchors, asft_lambda=LAM)
                resumed.train(resume_from_checkpoint=str(out / "trainer2" / f"checkpoint-{STEPS // 2}"))
            again = full_params(resumed_model)
            result["zero2/trainer_resumed_max_abs"] = max(float((again[n] - params[n]).abs().max()) for n in params)
            resumed.accelerator.free_memory()
        seen: list = [None, None]
        dist.all_gather_object(seen, model.seen)
        drift_logs: list = [None, None]
        dist.all_gather_object(drift_logs, [{k: v for k, v in log.items() if k.startswith("asft/")}
                                            for log in logs.logs if "loss" in log])
        result[f"zero{stage}/client"] = type(trainer.optimizer.optimizer.optimizer).__name__
        # The single-process run over the same global batches (rank 0's half, rank 1's half).
        ref = Regressor()
        ref.train(False)
        decay = [n for n, _ in ref.named_parameters() if not n.endswith("bias")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = AsFTAdamW.from_model(ref, anchors=anchors, lr=LR, weight_decay=0.01, asft_lambda=LAM,
                                       no_weight_decay=[n for n, _ in ref.named_parameters() if n not in decay])
        for step in range(STEPS):
            halves = []
            for r in range(2):
                ref.zero_grad()
                x, y = (torch.tensor(t) for t in seen[r][step])
                ref(x, y)["loss"].backward()
                halves.append([p.grad.clone() for p in ref.parameters()])
            for p, g0, g1 in zip(ref.parameters(), *halves):
                p.grad = g0 / 2 + g1 / 2
            opt.step()
        result[f"zero{stage}/max_rel"] = max_rel(params, {n: p.detach() for n, p in ref.named_parameters()})
        result[f"zero{stage}/drift_logs"] = drift_logs
        sums = opt.drift_sums()
        total = [sum(s[i] for s in sums.values()) for i in range(4)]
        from asft_optim.metrics import drift_from_sums
        result[f"zero{stage}/ref_cos"] = drift_from_sums(total[0], total[1], total[2], int(total[3])).cos
        trainer.accelerator.free_memory()
    # A config with an "optimizer" section: DeepSpeed would build its own optimizer (no AsFT).
    args = TrainingArguments(output_dir=str(out / "trainer_bad"), per_device_train_batch_size=4, report_to=[],
                             deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
                                        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})
    try:
        AsFTTrainer(model=Regressor(), args=args, train_dataset=data, anchors=anchors)
        result["optimizer_section_error"] = ""
    except ValueError as e:
        result["optimizer_section_error"] = str(e)
    return result


def main() -> None:
    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {mode: {"train": run_train, "ckpt": run_ckpt, "trainer": run_trainer}[mode](out, rank)
               for mode in modes}
    finish(out / f"{sys.argv[1]}.json", results)


if __name__ == "__main__":
    main()
