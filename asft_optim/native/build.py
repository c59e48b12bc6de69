"""Build the native CPU kernel (`asft_adamw.cpp`) on first use and share the build across processes.

The library is compiled with `torch.utils.cpp_extension.load` into
`$ASFT_NATIVE_CACHE/<key>` (default `~/.cache/asft_optim/native/<key>`), where the key hashes the
source, the torch version, the compiler, the flags and the CPU. A file lock makes concurrent processes
(torchrun ranks, pytest workers) build once; later processes import the finished library without
running the compiler. `ASFT_NATIVE=0` disables the kernel (the optimizer then takes its exact
PyTorch path), as does a missing compiler or ninja, or a failed build: `available()` is then False
and `reason()` says why in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["BuildInfo", "NativeUnavailable", "available", "build_info", "load", "reason", "cache_dir"]

SOURCE = Path(__file__).with_name("asft_adamw.cpp")
# -ffp-contract=off: no fused multiply-adds, so the fp32 update rounds as torch's AdamW writes it and
# the result does not depend on the instruction set; -march=native: the widest vectors of this CPU
# (the cache key names the CPU); -fno-math-errno lets sqrt vectorise; -fopenmp makes
# at::parallel_for use torch's OpenMP threads.
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be used in this process; the message says why (one line)."""


@dataclass(frozen=True)
class BuildInfo:
    """Where the loaded library lives and whether this process compiled it.

    path: the shared library. built: True if this process ran the compiler. seconds: wall time of
    the build (0.0 when reused).
    """
    path: Path
    built: bool
    seconds: float


_lock = threading.Lock()
_module: ModuleType | None = None
_info: BuildInfo | None = None
_error: str | None = None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    """The folder holding this source's build for this torch, compiler, flags and CPU."""
    root = os.environ.get("ASFT_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "asft_optim", "native")
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _compiler().encode(), " ".join(CFLAGS).encode(),
                 _cpu().encode()):
        h.update(part)
        h.update(b"\0")
    return Path(root) / h.hexdigest()[:16]


def _ninja_on_path() -> str | None:
    """A PATH with a ninja binary on it (the `ninja` wheel's, if the system has none), or None."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=path):
        return path
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel: its binary sits in BIN_DIR
        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for folder in candidates:
        if shutil.which("ninja", path=folder):
            return folder + os.pathsep + path
    return None


def _import(name: str, so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(folder: Path, name: str) -> ModuleType:
    """Compile into `folder` (the caller holds the lock); raises NativeUnavailable with the reason."""
    from torch.utils.cpp_extension import load as cpp_load
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler (CXX={cxx!r} not found)")
    path = _ninja_on_path()
    if path is None:
        raise NativeUnavailable("ninja not found (pip install ninja)")
    folder.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("PATH")
    os.environ["PATH"] = path
    try:
        return cpp_load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), build_directory=str(folder),
                        verbose=False)
    except Exception as e:
        log = folder / "build-error.log"
        log.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
        raise NativeUnavailable(f"the build failed ({type(e).__name__}; compiler output in {log})") from None
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def load() -> ModuleType:
    """The compiled module, building it first if no process has (thread- and process-safe).

    Raises NativeUnavailable (and keeps raising it in this process) when the kernel cannot be used.
    """
    global _module, _info, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is None and os.environ.get("ASFT_NATIVE", "1") == "0":
            _error = "disabled by ASFT_NATIVE=0"
        if _error is not None:
            raise NativeUnavailable(_error)
        from filelock import FileLock
        folder = cache_dir()
        name = f"asft_native_{folder.name}"
        so = folder / f"{name}.so"
        done = folder / "done"
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(folder) + ".lock"):
                if done.exists() and so.exists():
                    _module, _info = _import(name, so), BuildInfo(so, False, 0.0)
                else:
                    t0 = time.perf_counter()
                    _module = _build(folder, name)
                    _info = BuildInfo(so, True, time.perf_counter() - t0)
                    done.write_text(f"{_info.seconds:.1f} s\n", encoding="utf-8")
        except NativeUnavailable as e:
            _error = str(e)
            raise
        except (OSError, ImportError) as e:  # an unwritable cache folder, a library that does not load
            _error = f"{type(e).__name__}: {e}"
            raise NativeUnavailable(_error) from None
        return _module


def available() -> bool:
    """True when the native kernel is built (building it now if needed) and loaded."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def reason() -> str | None:
    """Why the native kernel is unavailable (one line), or None if it is loaded or not yet tried."""
    return _error


def build_info() -> BuildInfo | None:
    """How this process got the library (None before a successful `load`)."""
    return _info
