"""`asft project`: post-hoc projections of a fine-tuned model or LoRA adapter onto the safety basin.

    asft project MODEL --aligned ALIGNED --directions DIRS --mode flat|safelora --out OUT

flat      (full checkpoints) per tensor with a direction d:
              W' = W_aligned + C⊥(W − W_aligned),  C⊥x = x − û⟨û, x⟩,  û = d/‖d‖ (d flattened)
          i.e. the fine-tuning update without its component along d; computed in float64 and
          stored in the tensor's dtype. Tensors without a direction, or with d = 0, are unchanged.
safelora  (peft LoRA adapters) Safe LoRA (Hsu et al., 2024; its released code): per adapted layer,
          with V = d (out×in) and C = V·Vᵀ/‖V‖_F (not a projector), the projected update is C·B·A;
          layers where cos(C·B·A, B·A) ≤ threshold (default 0.5, its default), or, with
          `fraction`, the round(fraction·L) layers of lowest cosine, get lora_B ← C·B. C is never
          built: C·B = V(VᵀB)/‖V‖_F, and the cosine comes from r×r Gram matrices.

The output is written in the input's format (same safetensors file names and sharding, every other
file copied, plus `asft_project.json` describing what was done) into a temporary folder that is
renamed to OUT when complete: a failed run leaves no OUT. OUT must be new (or an empty folder) and
lie outside every input. The directions must have been made from ALIGNED (their recorded sampled
fingerprint), unless `allow_mismatch`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .adapters import ADAPTER_WEIGHTS, check_fits, is_adapter_folder, open_adapter
from .anchors import Anchors, atomic_save_safetensors
from .checkpoints import Checkpoint, CheckpointError, open_checkpoint, read_header
from .directions import check_made_from
from .outputs import refuse_overlap
from .tempfiles import staged_dir

__all__ = ["MODES", "INFO", "project_flat", "project_safelora", "flat_tensor", "safelora_layer", "add_cli"]

MODES = ("flat", "safelora")
INFO = "asft_project.json"
_CHUNK = 1 << 22  # elements per float64 piece


def flat_tensor(w: torch.Tensor, w_aligned: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(W_aligned + C⊥(W − W_aligned) in W's dtype, cos(W − W_aligned, d)); float64 inside, in
    flattened pieces of `_CHUNK` elements (two passes: the dot products, then the update)."""
    x, a, v = w.reshape(-1), w_aligned.reshape(-1), d.reshape(-1)
    vv = dx = xx = 0.0
    for s in range(0, x.numel(), _CHUNK):
        dv = v[s:s + _CHUNK].double()
        delta = x[s:s + _CHUNK].double() - a[s:s + _CHUNK].double()
        vv += float(dv @ dv)
        dx += float(dv @ delta)
        xx += float(delta @ delta)
    if vv == 0:
        return w.clone(), float("nan")
    c = dx / vv
    out = torch.empty_like(x)
    for s in range(0, x.numel(), _CHUNK):
        av = a[s:s + _CHUNK].double()
        delta = x[s:s + _CHUNK].double() - av
        out[s:s + _CHUNK] = (av + (delta - c * v[s:s + _CHUNK].double())).to(w.dtype)
    cos = dx / math.sqrt(vv * xx) if xx > 0 else float("nan")
    return out.view(w.shape), cos


def safelora_layer(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(C·B, cos(C·B·A, B·A)) for lora_A `a` (r×in), lora_B `b` (out×r), V = `v` (out×in), float64;
    C = V·Vᵀ/‖V‖_F. The cosine is NaN when V = 0 or B·A = 0."""
    a64, b64, v64 = a.double(), b.double(), v.double()
    norm = v64.norm()
    if norm == 0:
        return b.clone(), float("nan")
    cb = v64 @ (v64.T @ b64) / norm
    g = a64 @ a64.T  # r×r; ⟨X·A, Y·A⟩ = Σ (XᵀY) ⊙ G
    num = float(((cb.T @ b64) * g).sum())
    den = math.sqrt(max(float(((cb.T @ cb) * g).sum()), 0.0) * max(float(((b64.T @ b64) * g).sum()), 0.0))
    return cb.to(b.dtype), (num / den if den > 0 else float("nan"))


# ----------------------------------------------------------------------------------- output folder
def _check_out(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an existing non-empty `out` and one that overlaps an input (flag -> path)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists: choose a new --out (projections never overwrite)")
    refuse_overlap(out, "--out", inputs.items())


def _check_aligned(directions: str | Path, aligned: str | Path, allow_mismatch: bool) -> None:
    if not allow_mismatch:
        note = check_made_from(directions, aligned)
        if note:
            print(note, file=sys.stderr)


def _copy_others(src: Path, dst: Path, skip: set[str]) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, dst / f.name)


# ----------------------------------------------------------------------------------- flat
def project_flat(model: str | Path, aligned: str | Path, directions: str | Path, out: str | Path,
                 progress: bool = False, allow_mismatch: bool = False) -> dict[str, Any]:
    """Write W_aligned + C⊥(W − W_aligned) of a full checkpoint folder to `out`; returns the info
    written to `out/asft_project.json` (per-tensor cos(ΔW, d) of the tensors projected).

    Raises:
        ValueError: the model is a LoRA adapter, or the aligned checkpoint or the directions do not
            fit it (the message names the tensor); `out` overlaps an input.
        DirectionsMismatch: the directions were made from another aligned checkpoint (and not
            `allow_mismatch`).
        FileExistsError: `out` exists and is not empty.
    """
    from tqdm.auto import tqdm

    model, out = Path(model), Path(out)
    if is_adapter_folder(model):
        raise ValueError(f"--mode flat needs a full checkpoint, but {model} is a LoRA adapter: C⊥(s·B·A) is no "
                         "LoRA update of the same rank; use --mode safelora, or merge the adapter first")
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    _check_out(out, {"MODEL": model, "--aligned": aligned, "--directions": directions})
    ck, ak, anchors = _open(model, "model"), _open(aligned, "aligned"), Anchors.load(directions)
    extra = sorted(n for n in anchors if n not in ck.tensors)
    if extra:
        raise ValueError(f"directions {directions} do not fit model {model}: {len(extra)} direction(s) name tensors "
                         f"the model lacks, e.g. '{extra[0]}' (directions for another model?)")
    for name, info in ck.tensors.items():
        if name in anchors and tuple(anchors.shape(name)) != info.shape:
            raise ValueError(f"directions {directions} do not fit model {model}: '{name}' has shape "
                             f"{tuple(anchors.shape(name))} in the directions but {info.shape} in the model")
        if name in anchors and (name not in ak.tensors or ak.tensors[name].shape != info.shape):
            got = ak.tensors[name].shape if name in ak.tensors else "no such tensor"
            raise ValueError(f"aligned checkpoint {aligned} does not fit model {model}: '{name}' is {info.shape} "
                             f"in the model, {got} in the aligned checkpoint")
    _check_aligned(anchors, ak, allow_mismatch)
    with staged_dir(out) as tmp:
        cos: dict[str, float] = {}
        with tqdm(total=len(ck.tensors), desc="projecting (flat)", unit="tensor", disable=not progress) as bar:
            for file in ck.files:
                meta, infos = read_header(file)
                tensors = {}
                for info in infos:
                    w = _read(ck, info.name)
                    if info.name in anchors and info.is_floating_point:
                        tensors[info.name], cos[info.name] = flat_tensor(w, _read(ak, info.name), anchors[info.name])
                    else:
                        tensors[info.name] = w
                    bar.update(1)
                atomic_save_safetensors(tensors, tmp / file.name, {**meta, "asft_project": "flat"})
        _copy_others(model, tmp, {f.name for f in ck.files} | {INFO})
        info = {"mode": "flat", "model": str(model.resolve()), "aligned": str(aligned),
                "directions": str(directions), "directions_fingerprint": anchors.metadata.get("fingerprint"),
                "projected": len(cos), "unchanged": len(ck.tensors) - len(cos),
                "cos_delta_d": {k: (None if math.isnan(c) else c) for k, c in cos.items()}}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
    return info


def _open(source: str | Path, what: str) -> Checkpoint:
    try:
        return open_checkpoint(source)
    except CheckpointError as e:
        raise FileNotFoundError(f"{what}: {e}") from None


def _read(ck: Checkpoint, name: str) -> torch.Tensor:
    info = ck.tensors[name]
    return ck.read_into(name, torch.empty(info.shape, dtype=info.dtype))


# ----------------------------------------------------------------------------------- Safe LoRA
def project_safelora(adapter: str | Path, directions: str | Path, out: str | Path, *,
                     aligned: str | Path | None = None, threshold: float = 0.5,
                     fraction: float | None = None, allow_mismatch: bool = False) -> dict[str, Any]:
    """Write the Safe LoRA projection of a peft adapter folder to `out`; returns the info written to
    `out/asft_project.json` (per layer: the cosine and whether it was projected).

    Args:
        aligned: when given, the adapter is also checked against this checkpoint's shapes, and the
            directions against it (`check_made_from`, unless `allow_mismatch`).
        threshold: project layers with cos(C·B·A, B·A) ≤ threshold (ignored with `fraction`).
        fraction: project the round(fraction·L) layers with the lowest cosine instead.

    Raises:
        ValueError: not an adapter, no direction for an adapted layer, shapes that do not fit.
    """
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter}")
    if not is_adapter_folder(adapter):
        raise ValueError(f"--mode safelora projects LoRA adapters, but {adapter} has no adapter_config.json; "
                         "use --mode flat for a full checkpoint")
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1], got {fraction}")
    _check_out(out, {"MODEL": adapter, "--aligned": aligned, "--directions": directions})
    ad = open_adapter(adapter)
    ad.require_plain_lora("projected")
    anchors = Anchors.load(directions)
    check_fits(ad, {n: tuple(anchors.shape(n)) for n in anchors}, f"of the directions {directions}")
    if aligned is not None:
        ak = _open(aligned, "aligned")
        check_fits(ad, {n: i.shape for n, i in ak.tensors.items()}, str(aligned))
        _check_aligned(anchors, ak, allow_mismatch)
    layers: dict[str, dict[str, Any]] = {}
    new_b: dict[str, torch.Tensor] = {}
    for m in ad.modules:
        d = anchors[m.direction]
        new_b[m.module], c = safelora_layer(ad.read(m.a_name), ad.read(m.b_name), d.T if m.fan_in_fan_out else d)
        layers[m.module] = {"cos": None if math.isnan(c) else c, "projected": False}
    valid = [m for m in layers if layers[m]["cos"] is not None]
    if fraction is not None:
        chosen = set(sorted(valid, key=lambda m: layers[m]["cos"])[:round(fraction * len(layers))])
    else:
        chosen = {m for m in valid if layers[m]["cos"] <= threshold}
    tensors = {name: ad.read(name) for name in ad.weights.tensors}
    for m in ad.modules:
        if m.module in chosen:
            tensors[m.b_name] = new_b[m.module].contiguous()
            layers[m.module]["projected"] = True
    with staged_dir(out) as tmp:
        meta, _ = read_header(adapter / ADAPTER_WEIGHTS)
        atomic_save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, {**meta, "asft_project": "safelora"})
        _copy_others(adapter, tmp, {ADAPTER_WEIGHTS, INFO})
        info = {"mode": "safelora", "adapter": str(adapter.resolve()), "directions": str(directions),
                "directions_fingerprint": anchors.metadata.get("fingerprint"),
                "rule": {"fraction": fraction} if fraction is not None else {"threshold": threshold},
                "projected": len(chosen), "layers": layers}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "project", help="post-hoc projection of a fine-tuned model (flat) or LoRA adapter (Safe LoRA)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="fine-tuned model folder (flat) or peft adapter folder (safelora)")
    p.add_argument("--aligned", type=Path, required=True, help="the aligned model the fine-tuning started from")
    p.add_argument("--directions", type=Path, required=True, help="directions file (asft directions BASE ALIGNED)")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="safelora: project layers whose cosine is ≤ this (default %(default)s)")
    p.add_argument("--fraction", type=float, default=None,
                   help="safelora: project this fraction of layers, lowest cosine first (replaces --threshold)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use --directions even when they were made from another aligned checkpoint than --aligned")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        if args.mode == "flat":
            info = project_flat(args.model, args.aligned, args.directions, args.out, progress=True,
                                allow_mismatch=args.allow_mismatch)
            print(f"flat: projected {info['projected']} tensor(s), {info['unchanged']} unchanged")
        else:
            info = project_safelora(args.model, args.directions, args.out, aligned=args.aligned,
                                    threshold=args.threshold, fraction=args.fraction,
                                    allow_mismatch=args.allow_mismatch)
            rule = (f"the {args.fraction:g} of layers with the lowest cosine" if args.fraction is not None
                    else f"cos ≤ {args.threshold:g}")
            print(f"safelora: projected {info['projected']} of {len(info['layers'])} layer(s) ({rule}); "
                  "cos(C·B·A, B·A) per layer:")
            width = max(len(m) for m in info["layers"])
            for module, layer in info["layers"].items():
                cos = "   nan (B·A = 0 or d = 0)" if layer["cos"] is None else f"{layer['cos']:+.4f}"
                print(f"  {module:<{width}}  {cos}{'  projected' if layer['projected'] else ''}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"asft project: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
