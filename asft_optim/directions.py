"""Alignment directions d = W_aligned - W_base computed from two checkpoints, streamed.

`compute_directions` reads both checkpoints in pieces of at most `chunk_bytes` (positioned reads into
reused buffers), subtracts in fp32 (fp64 when an input or the output is fp64), rounds to the output
dtype (round to nearest even), checks the result is finite, and hands it to a worker thread that
hashes it into the fingerprint and appends it to the output file. Resident memory is a few chunk
buffers (about 16 bytes per element of a piece), whatever the size of the models. The output is
a safetensors file whose header is written first with a placeholder fingerprint that is filled in
at the end; it is written under a temporary name in the target folder and renamed only when complete
(temporary files that killed runs left behind are removed first: see `tempfiles`). It is never
written onto one of the two checkpoints or into their folders.

The file records what it was made from: the sources and a sampled content fingerprint of each
checkpoint (`Checkpoint.sampled_fingerprint`), so that `check_made_from` can refuse a directions
file used with another aligned checkpoint than its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .anchors import FORMAT, Anchors, fingerprint_entry, fingerprint_hasher, normalize_name
from .checkpoints import SAFETENSORS_FROM_DTYPE, Checkpoint, CheckpointError, open_checkpoint, read_header
from .outputs import Input, refuse_overlap
from .tempfiles import create_temp, release_temp

__all__ = ["compute_directions", "check_made_from", "checkpoint_inputs", "DirectionsMismatch",
           "ZeroDirectionWarning", "DTYPES", "add_cli"]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                                  "fp16": torch.float16, "float16": torch.float16,
                                  "fp32": torch.float32, "float32": torch.float32,
                                  "fp64": torch.float64, "float64": torch.float64}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
_PLACEHOLDER = "0" * 64  # hex blake2b-256, same length as the real fingerprint


class ZeroDirectionWarning(UserWarning):
    """Some tensors are identical in the base and the aligned checkpoint (d = 0)."""


class DirectionsMismatch(ValueError):
    """A directions file used with another checkpoint than the one it was made from."""


@dataclass(frozen=True)
class _Plan:
    key: str            # normalised name: sort key and fingerprint key
    name: str           # name in both checkpoints and in the output file
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    numel: int


def compute_directions(
    base: str | os.PathLike | Checkpoint,
    aligned: str | os.PathLike | Checkpoint,
    out: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    progress: bool | None = None,
    chunk_bytes: int = 16 << 20,
) -> Anchors:
    """Directions d = W_aligned - W_base for every floating-point tensor of two checkpoints.

    Args:
        base, aligned: a `.safetensors` file, a model folder (with `model.safetensors.index.json` and
            its shards, or one `model.safetensors`), a Hugging Face Hub id, or an open `Checkpoint`.
        out: write the directions to this safetensors file (atomically) and return them mapped lazily
            from it. When `None`, the directions are returned in memory (their total size in RAM).
        dtype: output dtype, `"bf16"`, `"fp16"`, `"fp32"` (or a torch dtype); `None` keeps each tensor
            in the aligned checkpoint's dtype (fp32 for non-standard floating types such as fp8).
            The difference is taken in fp32 (fp64 if an input or the output is fp64) and rounded to
            nearest even.
        include, exclude: regular expression(s) matched with `re.search` against tensor names; a
            tensor is kept if it matches some `include` (all when `None`) and no `exclude`.
        progress: show a progress bar over bytes and tensors (`None`: only on a terminal).
        chunk_bytes: size of a piece as fp32 bytes (`chunk_bytes // 4` elements); the buffers take
            about 4× this, independent of the largest tensor.

    The work is memory-bound and a worker thread hashes and writes while the caller's thread reads
    and subtracts; `torch.set_num_threads(1)` (what `asft directions` does) keeps torch's intra-op
    threads from competing with it.

    Returns:
        `Anchors` keyed by the checkpoints' tensor names, with metadata `format`, `fingerprint`,
        `base`, `aligned` (canonical sources), `base_sampled`, `aligned_sampled` (their
        `Checkpoint.sampled_fingerprint`), `dtype`, `skipped` (non-floating tensors, JSON list) and
        `created_by`.

    Raises:
        CheckpointError: a source is missing, truncated or malformed; a tensor is present in only one
            checkpoint (names listed); shapes differ (both shapes given); a difference is NaN or Inf,
            or overflows the output dtype (tensor named). Nothing is written at `out` in these cases.
        ValueError: `out` is one of the checkpoints' files or lies inside a checkpoint folder.

    Warns:
        ZeroDirectionWarning: naming the tensors whose difference is exactly zero.
    """
    from . import __version__

    out_dtype = _parse_dtype(dtype)
    bc = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    ac = aligned if isinstance(aligned, Checkpoint) else open_checkpoint(aligned)
    if out is not None:
        refuse_overlap(out, "the output", checkpoint_inputs("base", bc) + checkpoint_inputs("aligned", ac))
    plans, skipped = _plan(bc, ac, out_dtype, _patterns(include, "include"), _patterns(exclude, "exclude"))
    if skipped:
        log.info("skipped %d non-floating tensor(s): %s", len(skipped), _names(skipped))
    metadata = {"format": FORMAT, "fingerprint": _PLACEHOLDER, "base": bc.source, "aligned": ac.source,
                "base_sampled": bc.sampled_fingerprint(), "aligned_sampled": ac.sampled_fingerprint(),
                "dtype": _SHORT[out_dtype] if out_dtype else "as aligned", "skipped": json.dumps(skipped),
                "created_by": f"asft_optim {__version__}"}
    for key, pats in (("include", include), ("exclude", exclude)):
        if pats is not None:
            metadata[key] = json.dumps([pats] if isinstance(pats, str) else list(pats))
    chunk_elems = max(1, chunk_bytes // 4)
    if out is None:
        tensors: dict[str, torch.Tensor] = {}
        fingerprint, zero = _stream(bc, ac, plans, chunk_elems, progress, sink=tensors)
        metadata["fingerprint"] = fingerprint
        _warn_zero(zero)
        return Anchors.from_tensors(tensors, metadata)
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"output path is a folder: {out}; give a file name such as "
                                f"{out / 'directions.safetensors'}")
    writer = _StreamingWriter(out, plans, metadata)
    try:
        fingerprint, zero = _stream(bc, ac, plans, chunk_elems, progress, sink=writer)
        writer.commit(fingerprint)
    finally:
        writer.discard()
    _warn_zero(zero)
    return Anchors.load(out, verify=False)


def checkpoint_inputs(flag: str, ck: Checkpoint) -> list[Input]:
    """The paths a checkpoint reads, for `refuse_overlap`: its file, or its folder(s) and files."""
    files: list[Input] = [(flag, f) for f in ck.files]
    if Path(ck.source).is_file():
        return files
    return [(flag, ck.source), *((flag, f) for f in dict.fromkeys(f.parent for f in ck.files)), *files]


def check_made_from(directions: str | os.PathLike | Anchors, aligned: str | os.PathLike | Checkpoint, *,
                    flag: str = "--aligned", allow_flag: str = "--allow-mismatch") -> str | None:
    """Check that `directions` were made from the checkpoint `aligned`, by its sampled fingerprint.

    Returns a note when the file cannot tell (made before fingerprints were recorded), else None.

    Raises:
        DirectionsMismatch: the file was made from another aligned checkpoint; the message names
            both and `allow_flag`, the option that lets the caller go on.
    """
    anchors = directions if isinstance(directions, Anchors) else Anchors.load(directions, verify=False)
    where = anchors.path or "the directions"
    recorded = anchors.metadata.get("aligned_sampled")
    if recorded is None:
        return (f"note: {where} records no fingerprint of its aligned checkpoint (made by an older asft), so "
                f"{flag} cannot be checked against it")
    ck = aligned if isinstance(aligned, Checkpoint) else open_checkpoint(aligned)
    if ck.sampled_fingerprint() != recorded:
        raise DirectionsMismatch(
            f"the directions {where} were made from the aligned checkpoint {anchors.metadata.get('aligned')}, "
            f"but {flag} {ck.source} differs from it (sampled content fingerprints {recorded[:12]}… vs "
            f"{ck.sampled_fingerprint()[:12]}…): d = W_aligned − W_base would anchor another model. Compute the "
            f"directions from this checkpoint (asft directions BASE ALIGNED), or pass {allow_flag} to go on")
    return None


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _SHORT:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of bf16, fp16, fp32, fp64 (or the torch dtype), got {dtype!r}")


def _patterns(p: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]] | None:
    if p is None:
        return None
    items = [p] if isinstance(p, str) else list(p)
    try:
        return [re.compile(x) for x in items]
    except re.error as e:
        raise ValueError(f"{what}: invalid regular expression {e.pattern!r}: {e}") from None


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _plan(bc: Checkpoint, ac: Checkpoint, out_dtype: torch.dtype | None,
          include: list[re.Pattern[str]] | None, exclude: list[re.Pattern[str]] | None
          ) -> tuple[list[_Plan], list[str]]:
    """Check the two checkpoints against each other; return the work in fingerprint order and the
    names of the skipped non-floating tensors."""
    def wanted(n: str) -> bool:
        return ((include is None or any(p.search(n) for p in include))
                and not (exclude and any(p.search(n) for p in exclude)))

    names_b = [n for n in bc.tensors if wanted(n)]
    names_a = [n for n in ac.tensors if wanted(n)]
    only_b = sorted(set(names_b) - set(names_a))
    only_a = sorted(set(names_a) - set(names_b))
    if only_b or only_a:
        parts = [f"{len(v)} only in {src.source}: {_names(v)}" for v, src in ((only_b, bc), (only_a, ac)) if v]
        raise CheckpointError("the checkpoints hold different tensors; " + "; ".join(parts)
                              + " (use --include/--exclude to leave tensors out)")
    if not names_a:
        raise CheckpointError(f"no tensor of {ac.source} matches the include/exclude patterns")
    shapes = [(n, bc.tensors[n].shape, ac.tensors[n].shape) for n in names_a
              if bc.tensors[n].shape != ac.tensors[n].shape]
    if shapes:
        shown = "; ".join(f"'{n}': base {list(sb)} vs aligned {list(sa)}" for n, sb, sa in shapes[:10])
        more = f" and {len(shapes) - 10} more" if len(shapes) > 10 else ""
        raise CheckpointError(f"{len(shapes)} tensor(s) differ in shape between the checkpoints: {shown}{more}")
    plans: list[_Plan] = []
    skipped: list[str] = []
    keys: dict[str, str] = {}
    for n in names_a:
        ib, ia = bc.tensors[n], ac.tensors[n]
        if not ib.is_floating_point and not ia.is_floating_point:
            skipped.append(n)
            continue
        if ib.is_floating_point != ia.is_floating_point:
            raise CheckpointError(f"tensor '{n}' is {ib.dtype_str} in the base checkpoint but {ia.dtype_str} in "
                                  "the aligned one: one is floating point and the other is not")
        key = normalize_name(n)
        if key in keys:
            raise CheckpointError(f"tensors '{keys[key]}' and '{n}' both normalise to the parameter name '{key}'")
        keys[key] = n
        od = out_dtype or (ia.dtype if ia.dtype in _SHORT else torch.float32)
        plans.append(_Plan(key, n, ia.shape, od, ia.numel))
    if not plans:
        raise CheckpointError(f"no floating-point tensor to compare (skipped {len(skipped)} non-floating)")
    plans.sort(key=lambda p: p.key)
    return plans, sorted(skipped)


class _StreamingWriter:
    """Writes a safetensors file whose layout is known in advance, tensor data appended in order.

    The header (with a placeholder fingerprint) goes first; `commit` fills in the fingerprint,
    flushes to disk and renames the temporary file onto the target; `discard` removes the temporary
    file if `commit` did not happen.
    """

    def __init__(self, path: Path, plans: list[_Plan], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for p in plans:
            nbytes = p.numel * p.out_dtype.itemsize
            header[p.name] = {"dtype": SAFETENSORS_FROM_DTYPE[p.out_dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        mark = f'"fingerprint":"{_PLACEHOLDER}"'.encode()
        self._fp_pos = 8 + raw.index(mark) + len(b'"fingerprint":"')
        self.path = path
        fd, tmp = create_temp(path)  # removes temporary files of killed writers of `path` first
        self.tmp: Path | None = tmp
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._end = 8 + len(raw) + offset

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the bytes of `piece` (contiguous, output dtype) to the data of tensor `name`."""
        self._fh.write(memoryview(piece.view(torch.uint8).numpy()))

    def commit(self, fingerprint: str) -> None:
        if self._fh.tell() != self._end:
            raise RuntimeError(f"internal error: wrote {self._fh.tell()} bytes, expected {self._end}")
        self._fh.seek(self._fp_pos)
        self._fh.write(fingerprint.encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        release_temp(self.tmp, remove=False)
        self.tmp = None

    def discard(self) -> None:
        self._fh.close()
        if self.tmp is not None:
            release_temp(self.tmp, remove=True)
            self.tmp = None


def _stream(bc: Checkpoint, ac: Checkpoint, plans: list[_Plan], chunk_elems: int, progress: bool | None,
            sink: _StreamingWriter | dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    """Compute every planned direction piece by piece and hand the pieces to `sink`.

    The main thread reads and subtracts; one worker thread hashes and writes (both release the GIL),
    in submission order, from two alternating output buffers.

    Returns the fingerprint (hex) and the names of the all-zero directions.
    """
    total = sum(bc.tensors[p.name].nbytes + ac.tensors[p.name].nbytes for p in plans)
    h = fingerprint_hasher()
    zero: list[str] = []
    bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # reused buffers, one per (role, dtype)
    pending: list[Future | None] = [None, None]  # the job still using output buffer 0 / 1

    def buffer(role: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        b = bufs.get((role, dtype))
        if b is None or b.numel() < n:
            b = bufs[(role, dtype)] = torch.empty(min(chunk_elems, max(n, 1)), dtype=dtype)
        return b[:n]

    def emit(name: str, piece: torch.Tensor, full: torch.Tensor | None, start: int) -> None:
        h.update(memoryview(piece.view(torch.uint8).numpy()))
        if full is None:
            sink.write(name, piece)
        else:
            full.view(-1)[start:start + piece.numel()] = piece

    with ThreadPoolExecutor(1, thread_name_prefix="asft-write") as worker, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="directions", leave=False,
                 disable=False if progress else None if progress is None else True) as bar:
        k = 0  # pieces so far; k % 2 picks the output buffer
        for i, p in enumerate(plans):
            bar.set_postfix_str(f"tensor {i + 1}/{len(plans)}", refresh=False)
            ib, ia = bc.tensors[p.name], ac.tensors[p.name]
            cdtype = torch.float64 if torch.float64 in (ib.dtype, ia.dtype, p.out_dtype) else torch.float32
            worker.submit(h.update, fingerprint_entry(p.key, p.out_dtype, p.shape))
            full = None
            if isinstance(sink, dict):
                full = sink[p.name] = torch.empty(p.shape, dtype=p.out_dtype)
            nonzero = p.numel == 0
            for start in range(0, p.numel, chunk_elems):
                n = min(chunk_elems, p.numel - start)
                a = ac.read_into(p.name, buffer("a", ia.dtype, n), start)
                b = bc.read_into(p.name, buffer("b", ib.dtype, n), start)
                slot = k % 2
                if pending[slot] is not None:
                    pending[slot].result()  # its buffer is free again (and its errors surface here)
                out = buffer(f"out{slot}", p.out_dtype, n)
                if a.dtype == b.dtype == p.out_dtype and cdtype != torch.float64:
                    # torch computes bf16/fp16 arithmetic in fp32 and rounds once: the same values as
                    # below in one pass
                    o = torch.sub(a, b, out=out)
                else:
                    # same-dtype ops: a mixed bf16/fp32 sub_ is several times slower than two casts
                    a = a if a.dtype == cdtype else buffer("a32", cdtype, n).copy_(a)
                    b = b if b.dtype == cdtype else buffer("b32", cdtype, n).copy_(b)
                    # rounded to the output dtype (nearest even) when it is narrower
                    o = torch.sub(a, b, out=out) if p.out_dtype == cdtype else out.copy_(a.sub_(b))
                lo, hi = (float(x) for x in torch.aminmax(o))
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise _nonfinite(p, start, bc.read_into(p.name, torch.empty(n, dtype=ib.dtype), start),
                                     o, ac, bc)
                nonzero = nonzero or lo != 0.0 or hi != 0.0
                pending[slot] = worker.submit(emit, p.name, o, full, start)
                k += 1
                bar.update(n * (ib.dtype.itemsize + ia.dtype.itemsize))
            if not nonzero:
                zero.append(p.name)
        for f in pending:
            if f is not None:
                f.result()
        worker.submit(lambda: None).result()  # every hash update is done
    return h.hexdigest(), zero


def _nonfinite(p: _Plan, start: int, b: torch.Tensor, o: torch.Tensor, ac: Checkpoint,
               bc: Checkpoint) -> CheckpointError:
    """Explain where a non-finite direction value came from (input NaN/Inf, inf - inf, or overflow).

    `b` is the base piece starting at flat index `start`, `o` the direction piece in the output dtype.
    """
    where = f"tensor '{p.name}'"
    a = ac.read_into(p.name, torch.empty(b.numel(), dtype=ac.tensors[p.name].dtype), start)
    for side, t, src in (("base", b, bc), ("aligned", a, ac)):
        bad = ~torch.isfinite(t)
        if bad.any():
            j = start + int(bad.nonzero()[0])
            return CheckpointError(f"{where} holds {int(bad.sum())} NaN/Inf value(s) in the {side} checkpoint "
                                   f"({src.source}), first at flat index {j}: {float(t.view(-1)[j - start])}")
    d = a.double() - b.double()
    bad = ~torch.isfinite(d)
    if bad.any():
        j = start + int(bad.nonzero()[0])
        return CheckpointError(f"{where}: the difference aligned - base is not finite at flat index {j}")
    j = int((~torch.isfinite(o)).nonzero()[0])
    return CheckpointError(f"{where}: the difference {float(d[j])} at flat index {start + j} overflows "
                           f"the output dtype {p.out_dtype}; use dtype fp32")


def _warn_zero(zero: list[str]) -> None:
    if zero:
        warnings.warn(f"the base and aligned checkpoints are identical on {len(zero)} tensor(s), so their "
                      f"direction is zero (AsFT then pulls them back to W0 like L2): {_names(zero)}",
                      ZeroDirectionWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    """Register `asft directions BASE ALIGNED -o OUT`."""
    p = subparsers.add_parser(
        "directions", help="compute d = W_aligned - W_base from two checkpoints",
        description="Compute the alignment directions d = W_aligned - W_base tensor by tensor and save "
                    "them to a safetensors file. BASE and ALIGNED may be a .safetensors file, a model "
                    "folder (sharded with model.safetensors.index.json, or one file) or a Hub id.")
    p.add_argument("base", help="the base (pre-alignment) checkpoint")
    p.add_argument("aligned", help="the aligned (chat/instruct) checkpoint")
    p.add_argument("-o", "--out", required=True,
                   help="output .safetensors file (new; an existing directions file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing directions file at --out (once the new one is complete)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="output dtype (default: the aligned checkpoint's dtype per tensor)")
    p.add_argument("--include", action="append", metavar="REGEX",
                   help="keep only tensors whose name matches (repeatable: any of them)")
    p.add_argument("--exclude", action="append", metavar="REGEX",
                   help="leave out tensors whose name matches (repeatable)")
    p.add_argument("--chunk-mb", type=int, default=16, help="MiB of fp32 work per piece")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out is replaced only with --overwrite, and only when it is a directions file."""
    if out.is_dir():
        raise IsADirectoryError(f"-o {out} is a folder; give a file name such as {out / 'directions.safetensors'}")
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"-o {out} exists: pass --overwrite to replace it, or choose another file")
    try:
        fmt = read_header(out)[0].get("format", "")
    except CheckpointError:
        fmt = ""
    if not fmt.startswith("asft-directions/"):
        raise FileExistsError(f"--overwrite: {out} is not a directions file (its metadata says format "
                              f"{fmt or 'none'!r}); not replacing it")


def _run_cli(args) -> int:
    import sys

    # The pieces are memory-bound and a second thread hashes and writes: more intra-op threads only
    # compete with it (on 2 busy cores they doubled the CPU time; see benchmarks/RESULTS.md).
    torch.set_num_threads(1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    package_log = logging.getLogger("asft_optim")  # this module's notes and those of `tempfiles`
    package_log.addHandler(handler)
    level = package_log.level
    package_log.setLevel(logging.INFO)
    try:
        bc, ac = open_checkpoint(args.base), open_checkpoint(args.aligned)
        refuse_overlap(args.out, "-o", checkpoint_inputs("BASE", bc) + checkpoint_inputs("ALIGNED", ac))
        _check_out(Path(args.out), args.overwrite)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ZeroDirectionWarning)
            anchors = compute_directions(bc, ac, args.out, args.dtype, args.include,
                                         args.exclude, progress=False if args.no_progress else None,
                                         chunk_bytes=args.chunk_mb << 20)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"asft directions: error: {e}", file=sys.stderr)
        return 1
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(level)
    nbytes = sum(anchors.shape(k).numel() * anchors.dtype(k).itemsize for k in anchors)
    print(f"wrote {len(anchors)} directions ({nbytes / 2**20:.1f} MiB, dtype {anchors.metadata['dtype']}) "
          f"to {args.out}\nfingerprint {anchors.fingerprint}")
    return 0
