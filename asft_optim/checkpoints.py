"""Read-only, lazy access to the tensors of a safetensors checkpoint.

A checkpoint is one of:

- a single `.safetensors` file;
- a model folder holding `model.safetensors.index.json` and the shards it names, or a single
  `model.safetensors` (or exactly one `*.safetensors` file);
- a Hugging Face Hub id (`org/name`, optionally `org/name@revision`), fetched with `huggingface_hub`
  (only the safetensors weights and their index).

Headers are parsed here (8-byte little-endian header length, JSON header, then the raw bytes), and
tensor data is read with positioned reads into buffers the caller owns. No file is memory-mapped, so
the process's resident memory holds only the chunks being worked on, whatever the size of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "is_hub_id", "open_checkpoint",
           "DTYPE_FROM_SAFETENSORS", "SAFETENSORS_FROM_DTYPE", "INDEX_NAME", "SAMPLE_BLOCKS", "SAMPLE_BYTES"]

INDEX_NAME = "model.safetensors.index.json"
SAMPLE_BLOCKS, SAMPLE_BYTES = 8, 4096  # `Checkpoint.sampled_fingerprint`: blocks per tensor, bytes per block
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?$")

DTYPE_FROM_SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_SAFETENSORS.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, malformed, or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live.

    Attributes:
        name: the tensor's name in the checkpoint.
        dtype: its torch dtype (`None` for a safetensors dtype torch cannot hold, e.g. U16).
        dtype_str: the safetensors dtype code (`"BF16"`, `"F32"`, ...).
        shape: its shape.
        file: the file holding it.
        offset: absolute byte offset of its first byte in `file`.
        nbytes: its size in bytes.
    """
    name: str
    dtype: torch.dtype | None
    dtype_str: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_floating_point(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point


class Checkpoint:
    """The tensors of one checkpoint, read on demand. Use `open_checkpoint` to make one.

    Args:
        files: the safetensors files holding the tensors (their headers are read and checked now).
        source: the canonical source recorded in directions files.
        index, expected: the `model.safetensors.index.json` and its name -> shard map, when sharded;
            every tensor must be in the shard the index names, and every indexed tensor present.

    Attributes:
        source: the canonical source: an absolute path, or `org/name@commit` for a Hub id.
        files: the safetensors files, in index order.
        metadata: the string metadata of the first file's header (`{"format": "pt"}` for transformers).
        tensors: name -> `TensorInfo`, in the order the headers list them.
    """

    def __init__(self, files: list[Path], source: str, *, index: Path | None = None,
                 expected: dict[str, Path] | None = None) -> None:
        self.source = source
        self.files = files
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for i, file in enumerate(files):
            meta, infos = read_header(file)
            if i == 0:
                self.metadata = meta
            for info in infos:
                if info.name in self.tensors:
                    raise CheckpointError(f"tensor '{info.name}' appears in both {self.tensors[info.name].file} "
                                          f"and {file}")
                if expected is not None and expected.get(info.name) != file:
                    where = expected.get(info.name)
                    raise CheckpointError(
                        f"{index}: tensor '{info.name}' is in shard {file.name} but the index "
                        + (f"puts it in {where.name}" if where else "does not list it"))
                self.tensors[info.name] = info
        if expected is not None:
            absent = sorted(set(expected) - set(self.tensors))
            if absent:
                raise CheckpointError(f"{index} lists {len(absent)} tensor(s) that its shards do not hold: "
                                      f"{_names(absent)}")

    def __repr__(self) -> str:
        return f"Checkpoint('{self.source}', {len(self.tensors)} tensors in {len(self.files)} file(s))"

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Read elements `start : start + out.numel()` of the flattened tensor `name` into `out`.

        Args:
            out: a contiguous CPU tensor of the stored dtype (any shape); filled in place and returned.
            start: the first flat element index.
        """
        info = self.tensors[name]
        if out.dtype != info.dtype:
            raise TypeError(f"read_into('{name}'): buffer dtype {out.dtype} differs from stored {info.dtype}")
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_into('{name}'): the buffer must be a contiguous CPU tensor")
        n = out.numel()
        if start < 0 or start + n > info.numel:
            raise IndexError(f"read_into('{name}'): elements {start}:{start + n} outside 0:{info.numel}")
        if n == 0:
            return out
        itemsize = info.nbytes // info.numel
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as fh:
            _pread_exact(fh, view, info.offset + start * itemsize, info, n * itemsize)
        return out

    def sampled_fingerprint(self) -> str:
        """A cheap content fingerprint (hex blake2b-256): for every tensor in name order, its name,
        dtype, shape and `SAMPLE_BLOCKS` blocks of `SAMPLE_BYTES` bytes of its data, evenly spaced
        from its first to its last byte (the whole tensor when it is smaller).

        Reads about 32 KiB per tensor (9 MiB for a 7B Llama's 291 tensors), whatever the model's
        size. It tells apart two checkpoints whose tensors differ in names, dtypes or shapes, and
        two fine-tunes or alignments of one model (they change every sampled block). It does not
        see a change confined to bytes between the samples (one edited row, a few weights), and it
        ignores how the tensors are split into files and the files' metadata, so a re-sharded copy
        has the same fingerprint.
        """
        h = hashlib.blake2b(digest_size=32)
        for name in sorted(self.tensors):
            info = self.tensors[name]
            h.update(json.dumps([name, info.dtype_str, list(info.shape), info.nbytes]).encode())
            if info.nbytes <= SAMPLE_BLOCKS * SAMPLE_BYTES:
                spans = [(0, info.nbytes)]
            else:
                last = info.nbytes - SAMPLE_BYTES
                spans = [(k * last // (SAMPLE_BLOCKS - 1), SAMPLE_BYTES) for k in range(SAMPLE_BLOCKS)]
            with open(info.file, "rb", buffering=0) as fh:
                for pos, n in spans:
                    buf = bytearray(n)
                    _pread_exact(fh, memoryview(buf), info.offset + pos, info, n)
                    h.update(buf)
        return h.hexdigest()

    def iter_chunks(self, name: str, chunk_elems: int) -> Iterator[torch.Tensor]:
        """Yield the flattened tensor `name` in consecutive pieces of at most `chunk_elems` elements.

        Each piece is a view of one reused buffer: use it before asking for the next.
        """
        info = self.tensors[name]
        n = info.numel
        buf = torch.empty(min(n, chunk_elems), dtype=info.dtype)
        for start in range(0, n, chunk_elems):
            piece = buf[: min(chunk_elems, n - start)]
            yield self.read_into(name, piece, start)


def _pread_exact(fh, view: memoryview, pos: int, info: TensorInfo, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        got = os.preadv(fh.fileno(), [view[done:]], pos + done)
        if got == 0:
            raise CheckpointError(f"{info.file} is truncated: tensor '{info.name}' needs bytes up to "
                                  f"{pos + nbytes} but the file ends at {pos + done}")
        done += got


def read_header(file: Path) -> tuple[dict[str, str], list[TensorInfo]]:
    """Parse and check a safetensors header.

    Returns:
        (metadata, tensor infos in header order). Raises `CheckpointError` for a file that is missing,
        not safetensors, or shorter than its header says (truncated).
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is not a safetensors file (only {len(head)} bytes): truncated?")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file} is not a safetensors file, or is truncated: its first 8 bytes "
                                      f"give a {n}-byte header but the file has {size} bytes")
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {file}") from None
    except IsADirectoryError:
        raise CheckpointError(f"expected a .safetensors file, got a folder: {file}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: list[TensorInfo] = []
    end_max = 0
    for name, entry in header.items():
        try:
            dtype_str = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: malformed header entry for tensor '{name}': {entry!r}") from e
        dtype = DTYPE_FROM_SAFETENSORS.get(dtype_str)
        numel = 1
        for s in shape:
            numel *= s
        if dtype is not None and end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor '{name}' ({dtype_str}, shape {list(shape)}) should take "
                                  f"{numel * dtype.itemsize} bytes but its offsets give {end - begin}")
        if begin < 0 or end < begin:
            raise CheckpointError(f"{file}: tensor '{name}' has invalid data offsets [{begin}, {end}]")
        end_max = max(end_max, end)
        infos.append(TensorInfo(name, dtype, dtype_str, shape, file, base + begin, end - begin))
    if base + end_max > size:
        raise CheckpointError(f"{file} is truncated: its header describes {base + end_max} bytes but the file "
                              f"has {size}")
    return {str(k): str(v) for k, v in metadata.items()}, infos


def _read_index(index: Path) -> dict[str, Path]:
    """name -> shard path from a `model.safetensors.index.json`; checks that every shard exists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index (expected a JSON object with "
                              f"'weight_map'): {e}") from None
    shards = {s: index.parent / s for s in dict.fromkeys(weight_map.values())}
    missing = [s for s, p in shards.items() if not p.is_file()]
    if missing:
        held = sum(1 for s in weight_map.values() if s in missing)
        raise CheckpointError(f"{index} names shard(s) that are missing from {index.parent}: "
                              f"{', '.join(missing)} (holding {held} tensor(s))")
    return {name: shards[s] for name, s in weight_map.items()}


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hugging Face Hub id (`org/name[@revision]`), not a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily: reads headers only.

    Args:
        source: a `.safetensors` file, a model folder, or a Hugging Face Hub id (`org/name[@revision]`).

    Raises:
        CheckpointError: the source does not exist, holds no safetensors weights, a shard the index
            names is missing, a file is truncated or malformed, or the Hub cannot be reached.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return Checkpoint([path.resolve()], str(path.resolve()))
    if path.is_dir():
        return _open_folder(path.resolve(), str(path.resolve()))
    text = str(source)
    if is_hub_id(text):
        return _open_hub(text)
    raise CheckpointError(f"checkpoint not found: {text} (not a file, a folder, or a Hugging Face Hub id)")


def _open_folder(folder: Path, source: str) -> Checkpoint:
    index = folder / INDEX_NAME
    if index.is_file():
        expected = _read_index(index)
        return Checkpoint(list(dict.fromkeys(expected.values())), source, index=index, expected=expected)
    single = folder / "model.safetensors"
    if single.is_file():
        return Checkpoint([single], source)
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return Checkpoint(found, source)
    if found:
        raise CheckpointError(f"{folder} holds {len(found)} .safetensors files but no {INDEX_NAME} to say which "
                              f"belong to the model: {_names([f.name for f in found])}")
    other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (it holds {_names(other)}: convert the weights to safetensors)" if other else ""
    raise CheckpointError(f"{folder} holds no safetensors weights{hint}")


def _open_hub(text: str) -> Checkpoint:
    repo_id, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"'{text}' is not a local file or folder; to fetch it from the Hugging Face Hub "
                              "install huggingface_hub (pip install 'asft_optim[hf]')") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None,
                                        allow_patterns=[INDEX_NAME, "model.safetensors"]))
        index = folder / INDEX_NAME
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=shards))
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated, HTTP
        raise CheckpointError(
            f"'{text}' is not a local file or folder, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). If this machine is offline, download the model elsewhere and pass "
            "its folder, or set HF_HUB_OFFLINE=1 with the model in the local cache.") from e
    return _open_folder(folder, f"{repo_id}@{folder.name}")
