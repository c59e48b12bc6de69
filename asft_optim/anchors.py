"""Alignment directions d = W_aligned - W_base, keyed by parameter name.

`Anchors` is the input side of the data flow (checkpoints → anchors → optimizer state → kernel):
a read-only mapping from normalised parameter names to direction tensors, either held in memory
(`Anchors.from_tensors`) or mapped lazily from a safetensors file (`Anchors.load`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from .tempfiles import atomic_save_safetensors

__all__ = ["Anchors", "normalize_name", "FORMAT"]

FORMAT = "asft-directions/1"

# Wrapper prefixes that DDP, torch.compile, FSDP1, activation checkpointing and peft add to names.
_LEADING = ("module.", "base_model.model.")
_ANYWHERE = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def normalize_name(name: str) -> str:
    """Strip wrapper prefixes so that `module._orig_mod.layer.weight` matches `layer.weight`.

    Removes leading `module.` (DDP) and `base_model.model.` (peft), `_orig_mod.` (torch.compile),
    `_fsdp_wrapped_module.` and `_checkpoint_wrapped_module.` anywhere, and peft's `.base_layer`
    (the wrapped base weight of a LoRA layer).
    """
    prev = None
    while prev != name:
        prev = name
        name = _ANYWHERE.sub(r"\1", name)
        for prefix in _LEADING:
            if name.startswith(prefix):
                name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


class Scaled(Protocol):
    """A direction kept as v = d / scale, with scale a power of two (`functional.BoundDirection`)."""
    v: torch.Tensor
    scale: float


class Anchors(Mapping[str, torch.Tensor]):
    """Per-tensor alignment directions, looked up by (normalised) parameter name.

    Tensors are returned on the CPU in their stored dtype; `AsFTAdamW` moves each to its
    parameter's device when it binds it. A file-backed `Anchors` reads a tensor only when asked; it
    records the file's identity (device, inode, size, modification time) when it opens it and
    refuses every later read once the file has changed, since its fingerprint describes the file as
    it was. An in-memory `Anchors` fingerprints its own tensors and ignores a `fingerprint` given in
    `metadata` (it drops that entry: `fingerprint` is the one source of truth). Once `AsFTAdamW` has
    bound an in-memory direction it holds it only as the bound copy (`adopt`), so the direction is
    in memory once.

    Attributes:
        metadata: string metadata (sources, dtype; a file's recorded fingerprint) from the
            safetensors header or the caller.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, *,
                 path: str | os.PathLike | None = None, metadata: Mapping[str, str] | None = None) -> None:
        if (tensors is None) == (path is None):
            raise ValueError("Anchors needs exactly one of `tensors` or `path`")
        self.metadata: dict[str, str] = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        self._identity: tuple[int, int, int, int] | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._adopted: dict[str, Scaled] = {}  # stored name -> its bound copy (see `adopt`)
        self._keys: dict[str, str] = {}  # normalised name -> stored name
        self._shapes: dict[str, torch.Size] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        if tensors is not None:
            for name, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"direction '{name}' is a {type(t).__name__}, expected a torch.Tensor")
                if not t.is_floating_point():
                    raise TypeError(f"direction '{name}' has dtype {t.dtype}; directions must be floating point")
                self._add_key(name, t.shape, t.dtype)
                self._tensors[name] = t.detach()
            self.metadata.pop("fingerprint", None)  # someone else's claim: never trusted for these tensors
            self._fingerprint: str | None = None
        else:
            self._identity = _file_identity(self.path)
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._add_key(name, torch.Size(sl.get_shape()), _DTYPES[sl.get_dtype()])
            self._check_unchanged()
            self._fingerprint = self.metadata.get("fingerprint")

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_adopted", {})  # pickled before `adopt` existed

    def _add_key(self, name: str, shape: torch.Size, dtype: torch.dtype) -> None:
        key = normalize_name(name)
        if key in self._keys:
            raise ValueError(f"directions '{self._keys[key]}' and '{name}' both normalise to '{key}'")
        self._keys[key] = name
        self._shapes[key] = shape
        self._dtypes[key] = dtype

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Anchors:
        """Directions held in memory, e.g. `{n: aligned[n] - base[n] for n in aligned}`."""
        return cls(tensors, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> Anchors:
        """Map a directions file lazily.

        Args:
            path: a `.safetensors` file written by `Anchors.save` or `compute_directions`.
            verify: recompute the content fingerprint and refuse the file if it differs from the one
                recorded in its metadata (reads the whole file once; switch off for speed).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"directions file not found: {path}")
        identity = _file_identity(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read directions file {path}: {e}") from e
        fmt = metadata.get("format")
        if fmt is not None and fmt != FORMAT:
            what = ("a model checkpoint, not a directions file: compute directions with "
                    "`asft directions BASE ALIGNED -o OUT`" if not fmt.startswith("asft-directions/")
                    else f"a directions file in format '{fmt}', which this version ({FORMAT}) cannot read")
            raise ValueError(f"{path} is {what} (its metadata says format '{fmt}')")
        anchors = cls(path=path, metadata=metadata)
        if anchors._identity != identity:  # replaced between reading its metadata and its tensor list
            raise RuntimeError(f"directions file {path} changed while Anchors.load read it; load it again")
        recorded = metadata.get("fingerprint")
        if verify and recorded is not None:
            actual = anchors._compute_fingerprint()
            if actual != recorded:
                raise ValueError(
                    f"directions file {path} does not match the fingerprint recorded in it "
                    f"(recorded {recorded[:16]}…, contents give {actual[:16]}…): the file was modified "
                    "or corrupted; recompute it, or pass verify=False to load it anyway")
        return anchors

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write all directions and their fingerprint to a safetensors file, atomically."""
        path = Path(path)
        meta = {**self.metadata, **(metadata or {}), "format": FORMAT, "fingerprint": self.fingerprint}
        tensors = {self._keys[k]: self.get_stored(k).contiguous() for k in self._keys}
        atomic_save_safetensors(tensors, path, meta)
        return path

    # ----------------------------------------------------------------------------- mapping
    def _key(self, name: str) -> str | None:
        key = normalize_name(name)
        return key if key in self._keys else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            raise KeyError(f"no direction for '{name}' (normalised: '{normalize_name(name)}')")
        return self.get_stored(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def get_stored(self, key: str) -> torch.Tensor:
        """The tensor under a normalised key, read from disk if file-backed."""
        stored = self._keys[key]
        if stored in self._adopted:
            return self._unscaled(stored)
        if self.path is None:
            return self._tensors[stored]
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            t = f.get_tensor(stored)
        self._check_unchanged()
        return t

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` along dim 0 of a direction, reading only those bytes from a file."""
        key = self._key(name)
        if key is None:
            raise KeyError(f"no direction for '{name}'")
        stored = self._keys[key]
        if stored in self._adopted:
            return self._unscaled(stored, start, stop)
        if self.path is None:
            return self._tensors[stored][start:stop]
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            t = f.get_slice(self._keys[key])[start:stop]
        self._check_unchanged()
        return t

    def adopt(self, key: str, bound: Scaled) -> bool:
        """Hold the in-memory direction `key` (a normalised key) as `bound.v·bound.scale` from now on,
        dropping this mapping's reference to d, so the bound copy is the one copy (d itself is freed
        unless the caller still holds it). Done only when that product equals d exactly, in d's dtype
        and shape (else nothing changes); reads then return it as a new CPU tensor. Returns whether
        it was adopted. A file-backed mapping holds no tensors: nothing to do."""
        stored = self._keys.get(key)
        if self.path is not None or stored is None or stored in self._adopted:
            return False
        d = self._tensors[stored]
        if bound.v.dtype != d.dtype or bound.v.shape != d.shape:
            return False
        self._adopted[stored] = bound
        if not torch.equal(self._unscaled(stored), d):
            del self._adopted[stored]
            return False
        del self._tensors[stored]
        return True

    def _unscaled(self, stored: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """d = v·scale of an adopted direction (rows start:stop along dim 0) on the CPU, in its dtype:
        exact, through float64 (scale is a power of two)."""
        b = self._adopted[stored]
        v = b.v if start is None else b.v[start:stop]
        return (v.to("cpu", torch.float64) * b.scale).to(v.dtype)

    def _check_unchanged(self) -> None:
        """Raise if the backing file is no longer the one opened (checked after each read: a read
        that raced with a replacement is refused too)."""
        if _file_identity(self.path) != self._identity:
            raise RuntimeError(
                f"directions file {self.path} changed after Anchors.load (its inode, size or "
                "modification time differ): its directions no longer match the fingerprint recorded "
                "at load; load it again")

    def shape(self, name: str) -> torch.Size:
        """Shape of a direction without reading its data."""
        return self._shapes[self._key(name) or normalize_name(name)]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._key(name) or normalize_name(name)]

    # ----------------------------------------------------------------------------- fingerprint
    @property
    def fingerprint(self) -> str:
        """Hex blake2b digest of names, dtypes, shapes and bytes of all directions (sorted by name)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = fingerprint_hasher()
        for key in sorted(self._keys):
            t = self.get_stored(key).contiguous()
            h.update(fingerprint_entry(key, t.dtype, t.shape))
            h.update(t.view(-1).view(torch.uint8).cpu().numpy().data if t.numel() else b"")
        return h.hexdigest()

    def __repr__(self) -> str:
        src = f"path='{self.path}'" if self.path else "in memory"
        return f"Anchors({len(self)} tensors, {src})"


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, modification time in ns) of a file, None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


def fingerprint_hasher() -> hashlib.blake2b:
    """The hash behind `Anchors.fingerprint`: feed it, for each normalised name in sorted order,
    `fingerprint_entry(...)` and then the tensor's bytes (C order, as stored)."""
    return hashlib.blake2b(digest_size=32)


def fingerprint_entry(key: str, dtype: torch.dtype, shape: torch.Size | tuple[int, ...]) -> bytes:
    """The bytes hashed before one tensor's data in the fingerprint."""
    return json.dumps([key, str(dtype), list(shape)]).encode()
