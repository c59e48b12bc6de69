"""Look inside a directions file, and measure how a fine-tuned checkpoint drifted relative to it.

- `direction_stats`: per layer, ‖d‖, ‖W_aligned‖ and ‖d‖/‖W_aligned‖, dtypes, all-zero tensors; also
  checks the file's fingerprint on the way (the same single read).
- `drift_report`: per tensor and per layer, for ΔW = W_finetuned - W_start, the quantities of
  `asft_optim.metrics`: ‖ΔW‖, cos(ΔW, d) and ‖C⊥ΔW‖/‖ΔW‖ (the analysis behind the paper's Table 1).
  A peft LoRA adapter folder is read as its effective update ΔW = s·B·A (`asft_optim.adapters`).
- `plot_drift`: those numbers as a PNG.

Every tensor is read in pieces, so memory stays at a few chunk buffers.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_drift_sums, check_fits, is_adapter_folder, open_adapter
from .anchors import Anchors, fingerprint_entry, fingerprint_hasher, normalize_name
from .checkpoints import Checkpoint, CheckpointError, open_checkpoint
from .drift_plot import depth_key, draw, layout
from .metrics import Drift, DriftSums, drift_from_sums, layer_of, per_layer, sums
from .outputs import refuse_overlap
from .tempfiles import atomic_write

__all__ = ["LayerStats", "DirectionStats", "direction_stats", "drift_report", "plot_drift", "add_cli"]

_CHUNK = 16 << 20  # elements per piece


@dataclass
class LayerStats:
    """Sums over the direction tensors of one layer. Norms are Frobenius norms of the concatenation."""
    tensors: int = 0
    numel: int = 0
    d_sq: float = 0.0             # ‖d‖²
    w_sq: float | None = 0.0      # ‖W_aligned‖², None when the aligned checkpoint is not available
    dtypes: set[str] = field(default_factory=set)
    zero: list[str] = field(default_factory=list)  # names of all-zero directions

    @property
    def d_norm(self) -> float:
        return math.sqrt(self.d_sq)

    @property
    def ratio(self) -> float | None:
        """‖d‖/‖W_aligned‖ (inf when W_aligned = 0 ≠ d; None when unknown)."""
        if self.w_sq is None:
            return None
        return self.d_norm / math.sqrt(self.w_sq) if self.w_sq > 0 else (0.0 if self.d_sq == 0 else math.inf)


@dataclass
class DirectionStats:
    """What `direction_stats` found: per-layer stats, their total, and the fingerprint check."""
    layers: dict[str, LayerStats]
    total: LayerStats
    metadata: dict[str, str]
    fingerprint_recorded: str | None
    fingerprint_actual: str
    aligned_source: str | None    # the checkpoint the ratios were taken against, None when unavailable
    aligned_error: str | None     # why it was unavailable


def _open_directions(path: str | os.PathLike) -> tuple[dict[str, str], Checkpoint, dict[str, str]]:
    """(metadata, the file as a `Checkpoint`, normalised key -> stored name in sorted key order)."""
    metadata = Anchors.load(path, verify=False).metadata  # refuses files that are not directions
    ck = open_checkpoint(path)
    keys = {normalize_name(n): n for n in ck.tensors}
    return metadata, ck, {k: keys[k] for k in sorted(keys)}


def _matching(keys: dict[str, str], ckpt: Checkpoint) -> dict[str, str]:
    """Normalised key -> name in `ckpt`, for the given keys."""
    return {k: n for n in ckpt.tensors if (k := normalize_name(n)) in keys}


def _pieces(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The tensor `name` of `ckpt` in pieces, after checking it has its direction's shape."""
    if ckpt.tensors[name].shape != shape:
        raise CheckpointError(f"tensor '{name}' in {ckpt.source} has shape {list(ckpt.tensors[name].shape)}, "
                              f"but its direction has shape {list(shape)}")
    return ckpt.iter_chunks(name, _CHUNK)


def direction_stats(directions: str | os.PathLike, aligned: str | os.PathLike | None = None) -> DirectionStats:
    """Per-layer norms of a directions file, and of the aligned weights they were taken from.

    Args:
        directions: a file written by `compute_directions`.
        aligned: the aligned checkpoint for ‖W_aligned‖; default: the `aligned` source recorded in the
            file's metadata. When it cannot be opened, the ratios are left out and the reason returned.
    """
    metadata, dck, keys = _open_directions(directions)
    source = aligned if aligned is not None else metadata.get("aligned")
    ack: Checkpoint | None = None
    err: str | None = None
    if source is None:
        err = "the file records no aligned checkpoint"
    else:
        try:
            ack = open_checkpoint(source)
        except CheckpointError as e:
            err = str(e)
    amap = _matching(keys, ack) if ack is not None else {}
    layers: dict[str, LayerStats] = {}
    h = fingerprint_hasher()
    for key, name in keys.items():
        info = dck.tensors[name]
        st = layers.setdefault(layer_of(key), LayerStats())
        st.tensors += 1
        st.numel += info.numel
        st.dtypes.add(info.dtype_str)
        h.update(fingerprint_entry(key, info.dtype, info.shape))
        d_sq = 0.0
        for piece in dck.iter_chunks(name, _CHUNK):
            h.update(memoryview(piece.view(torch.uint8).numpy()))
            d_sq += float(piece.double().square().sum())
        st.d_sq += d_sq
        if d_sq == 0.0:
            st.zero.append(name)
        if ack is None or st.w_sq is None:
            st.w_sq = None
        elif key not in amap:
            st.w_sq = None
            err = f"{ack.source} has no tensor '{name}' (ratios of its layer left out)"
        else:
            st.w_sq += sum(float(w.double().square().sum()) for w in _pieces(ack, amap[key], info.shape))
    total = LayerStats()
    for st in layers.values():
        total.tensors += st.tensors
        total.numel += st.numel
        total.d_sq += st.d_sq
        total.w_sq = None if total.w_sq is None or st.w_sq is None else total.w_sq + st.w_sq
        total.dtypes |= st.dtypes
        total.zero += st.zero
    ordered = {k: layers[k] for k in sorted(layers, key=depth_key)}
    return DirectionStats(ordered, total, metadata, metadata.get("fingerprint"), h.hexdigest(),
                          ack.source if ack is not None else None, err)


def drift_report(directions: str | os.PathLike, model: str | os.PathLike,
                 start: str | os.PathLike | None = None) -> tuple[dict[str, Drift], dict[str, Drift], list[str]]:
    """Drift of a fine-tuned checkpoint, per tensor and per layer.

    Args:
        directions: a file written by `compute_directions`.
        model: the fine-tuned checkpoint (file, folder or Hub id), or a peft LoRA adapter folder
            (ΔW = s·B·A of each adapted weight; the weights it does not adapt have ΔW = 0).
        start: the weights fine-tuning started from, W0; default: the aligned checkpoint recorded in
            the directions file. Not used with an adapter.

    Returns:
        (per-tensor drift keyed by direction name (adapted tensors only, for an adapter), per-layer
        drift in depth order (`drift_plot.depth_key`), names of directions (or, for an adapter, of adapted weights)
        that were left out because the other side lacks them).
    """
    if is_adapter_folder(model):
        if start is not None:
            raise CheckpointError(f"{model} is a LoRA adapter: its update s·B·A is ΔW itself, "
                                  "so --start does not apply")
        return _adapter_drift(directions, model)
    metadata, dck, keys = _open_directions(directions)
    start = start if start is not None else metadata.get("aligned")
    if start is None:
        raise CheckpointError(f"{directions} records no aligned checkpoint: pass the starting weights (--start)")
    fck, sck = open_checkpoint(model), open_checkpoint(start)
    fmap, smap = _matching(keys, fck), _matching(keys, sck)
    missing = [name for k, name in keys.items() if k not in fmap or k not in smap]
    if len(missing) == len(keys):
        raise CheckpointError(f"no tensor of the directions file is in both {fck.source} and {sck.source} "
                              f"(e.g. '{missing[0]}'): are these the same architecture?")
    tensor_sums: dict[str, DriftSums] = {}
    for key, name in keys.items():
        if key not in fmap or key not in smap:
            continue
        shape = dck.tensors[name].shape
        acc = [0.0, 0.0, 0.0, 0]
        for d, w, w0 in zip(dck.iter_chunks(name, _CHUNK), _pieces(fck, fmap[key], shape),
                            _pieces(sck, smap[key], shape), strict=True):
            s = sums(w.double() - w0.double(), d)
            acc = [a + b for a, b in zip(acc, s, strict=True)]
        tensor_sums[name] = DriftSums(acc[0], acc[1], acc[2], int(acc[3]))
    per_tensor = {name: drift_from_sums(*s) for name, s in tensor_sums.items()}
    layers = per_layer(tensor_sums)
    return per_tensor, {k: layers[k] for k in sorted(layers, key=depth_key)}, missing


def _row_reader(ck: Checkpoint, name: str) -> Callable[[int, int], torch.Tensor]:
    """`read(first, count)`: rows first:first+count of the 2-D tensor `name` of `ck`."""
    info = ck.tensors[name]
    cols = info.shape[1] if len(info.shape) == 2 else 1

    def read(first: int, count: int) -> torch.Tensor:
        return ck.read_into(name, torch.empty((count, cols), dtype=info.dtype), start=first * cols)

    return read


def _adapter_drift(directions: str | os.PathLike, folder: str | os.PathLike
                   ) -> tuple[dict[str, Drift], dict[str, Drift], list[str]]:
    """`drift_report` for a LoRA adapter folder."""
    _, dck, keys = _open_directions(directions)
    adapter = open_adapter(folder)
    adapter.require_plain_lora("inspected")
    missing = check_fits(adapter, {k: dck.tensors[name].shape for k, name in keys.items()},
                         f"of the directions {directions}", missing_ok=True)
    adapted = {m.direction: m for m in adapter.modules if m.direction not in missing}
    if not adapted:
        raise CheckpointError(f"no module adapted by {folder} has a direction in {directions} (e.g. '{missing[0]}'): "
                              "are these the same architecture?")
    tensor_sums: dict[str, DriftSums] = {}
    for key, name in keys.items():
        if key in adapted:
            tensor_sums[name] = adapter_drift_sums(adapter, adapted[key], _row_reader(dck, name))
        else:  # untouched by the adapter: ΔW = 0, but its ‖d‖ belongs to its layer
            uu = sum(float(p.double().square().sum()) for p in dck.iter_chunks(name, _CHUNK))
            tensor_sums[name] = DriftSums(0.0, uu, 0.0, dck.tensors[name].numel)
    adapted_names = {keys[k] for k in adapted}
    per_tensor = {n: drift_from_sums(*s) for n, s in tensor_sums.items() if n in adapted_names}
    layers = per_layer(tensor_sums)
    return per_tensor, {k: layers[k] for k in sorted(layers, key=depth_key)}, missing


def plot_drift(per_tensor: dict[str, Drift], layers: dict[str, Drift], path: str | os.PathLike,
               title: str = "") -> Path:
    """Save a PNG: per-layer cos(ΔW,d) and ‖C⊥ΔW‖/‖ΔW‖ (markers, lines only along the numbered blocks) and
    per-tensor values (dots), layers in depth order (`drift_plot`); layers with ΔW = 0 (not trained by a
    LoRA adapter) have no marker and say so on their tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = layout(layers, (k for k, v in layers.items() if v.delta_norm > 0))
    pos = {layer: i for i, layer in enumerate(plot.layers)}
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(layers) + 2), 6.5), sharex=True)
    for ax, attr, label in ((axes[0], "cos", "cos(ΔW, d)"), (axes[1], "orth_ratio", "‖C⊥ΔW‖ / ‖ΔW‖")):
        moved = {n: v for n, v in per_tensor.items() if v.delta_norm > 0}
        ax.scatter([pos[layer_of(n)] for n in moved], [getattr(v, attr) for v in moved.values()], s=10, alpha=0.5,
                   label="tensors")
        draw(ax, plot, [getattr(layers[k], attr) if layers[k].delta_norm > 0 else math.nan for k in plot.layers],
             marker="o", color="C3", label="layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    axes[1].set_xticks(range(len(plot.layers)))
    axes[1].set_xticklabels(plot.ticks(), rotation=90, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ tables
def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _stats_table(stats: DirectionStats) -> str:
    rows = [[layer, str(s.tensors), str(s.numel), _g(s.d_norm), _g(s.ratio), ",".join(sorted(s.dtypes)),
             str(len(s.zero))] for layer, s in (*stats.layers.items(), ("total", stats.total))]
    return _table(["layer", "tensors", "params", "‖d‖", "‖d‖/‖W_aligned‖", "dtype", "zero"], rows)


def _drift_table(first: str, drifts: dict[str, Drift]) -> str:
    rows = [[k, str(v.numel), _g(v.delta_norm), f"{v.cos:+.4f}", f"{v.orth_ratio:.4f}"] if v.delta_norm > 0 else
            [k, str(v.numel), "0", "–", "– (not trained)"] for k, v in drifts.items()]
    return _table([first, "params", "‖ΔW‖", "cos(ΔW,d)", "‖C⊥ΔW‖/‖ΔW‖"], rows)


# ------------------------------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    """Register `asft inspect DIRECTIONS [--aligned A] [--model FINETUNED [--start W0]]`."""
    p = subparsers.add_parser(
        "inspect", help="per-layer summary of a directions file, or the drift of a fine-tuned model",
        description="Without --model: per-layer ‖d‖, ‖d‖/‖W_aligned‖, dtype and all-zero tensors of a "
                    "directions file, and a check of its fingerprint. With --model: cos(ΔW, d) and "
                    "‖C⊥ΔW‖/‖ΔW‖ per tensor and per layer for ΔW = W_model - W_start, as tables and a PNG.")
    p.add_argument("directions", help="directions file written by `asft directions`")
    p.add_argument("--aligned", help="aligned checkpoint for ‖W_aligned‖ (default: the one recorded in the file)")
    p.add_argument("--model", help="fine-tuned checkpoint to measure, or a peft LoRA adapter folder (ΔW = s·B·A)")
    p.add_argument("--start", help="weights fine-tuning started from (default: the aligned checkpoint recorded "
                                   "in the file)")
    p.add_argument("--plot", default="drift.png",
                   help="PNG to write with --model (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--no-plot", action="store_true", help="with --model: tables only")
    p.add_argument("--layers-only", action="store_true", help="with --model: per-layer table only")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    try:
        if args.model is None:
            return _cli_stats(args)
        return _cli_drift(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"asft inspect: error: {e}", file=sys.stderr)
        return 1


def _cli_stats(args) -> int:
    stats = direction_stats(args.directions, args.aligned)
    meta = stats.metadata
    print(f"directions: {args.directions}")
    for key in ("format", "base", "aligned", "dtype", "created_by"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
    ok = stats.fingerprint_recorded == stats.fingerprint_actual
    print(f"  fingerprint: {stats.fingerprint_actual} "
          + ("(matches the file's record)" if ok else f"MISMATCH: the file records {stats.fingerprint_recorded}"))
    if stats.aligned_error:
        print(f"  ‖d‖/‖W_aligned‖ not shown: {stats.aligned_error} (pass --aligned)")
    print()
    print(_stats_table(stats))
    if stats.total.zero:
        print(f"\nall-zero directions ({len(stats.total.zero)}): {', '.join(stats.total.zero)}")
    return 0 if ok else 1


def _cli_drift(args) -> int:
    if not args.no_plot:
        plot = Path(args.plot)
        if plot.is_dir():
            raise IsADirectoryError(f"--plot {plot} is a folder; give a file name such as {plot / 'drift.png'}")
        if plot.exists() and not args.overwrite:
            raise FileExistsError(f"--plot {plot} exists: pass --overwrite to replace it, or choose another --plot "
                                  "(or --no-plot)")
        refuse_overlap(plot, "--plot", [("DIRECTIONS", args.directions), ("--model", args.model),
                                        ("--start", args.start), ("--aligned", args.aligned)])
    per_tensor, layers, missing = drift_report(args.directions, args.model, args.start)
    adapter = is_adapter_folder(args.model)
    if missing:
        what = ("adapted weight(s) left out, absent from the directions file" if adapter else
                "direction(s) left out, absent from the model or start checkpoint")
        print(f"note: {len(missing)} {what}: {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}",
              file=sys.stderr)
    if adapter:
        untouched = sum(v.numel for v in layers.values()) - sum(v.numel for v in per_tensor.values())
        print(f"LoRA adapter {args.model}: ΔW = s·B·A for {len(per_tensor)} weight(s); the layer rows count the "
              f"{untouched} parameters it does not adapt as ΔW = 0")
    if not args.layers_only:
        print(_drift_table("tensor", per_tensor))
        print()
    print(_drift_table("layer", layers))
    if not args.no_plot:
        path = plot_drift(per_tensor, layers, args.plot, title=f"drift of {args.model}")
        print(f"\nplot: {path}")
    return 0
