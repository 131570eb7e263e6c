"""Which implementations of pyvae's ops exist on this machine, and which one ``auto`` picks.

Backends:
    ``torch``  the pure-PyTorch reference (any device, any floating dtype including float64).
    ``cpu``    the C++ kernels of the extension ``pyvae._C`` (CPU tensors).
    ``cuda``   the CUDA C++ kernels of ``pyvae._C`` (CUDA tensors; needs a CUDA build of torch).
    ``triton`` the Triton kernels in ``pyvae.kernels`` (CUDA tensors; also CPU tensors when
               ``TRITON_INTERPRET=1`` was set before Triton was imported: that is how they are
               tested without a GPU).

``backend="auto"`` (the default of every op) takes ``PYVAE_BACKEND`` from the environment when it
is set, else picks per device: for CUDA tensors the GPU backend the benchmark measured faster for
that op (``AUTO_CUDA``), for CPU tensors ``cpu``; ``torch`` where the extension is missing.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

# The GPU backend `auto` picks per op, from bench/results (triton until a GPU run says otherwise).
AUTO_CUDA = {"reparam_kl": "triton", "likelihood": "triton", "vq": "triton"}

# Ops whose backends differ from BACKENDS: the backends they have.
IMPLEMENTED: dict[str, tuple[str, ...]] = {}


def _load_extension() -> ModuleType | None:
    try:
        return importlib.import_module("pyvae._C")
    except ImportError:
        return None


# Looked up once at import, so that backend resolution is plain Python that torch.compile traces.
_EXTENSION = _load_extension()
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def native_extension() -> ModuleType | None:
    """The compiled extension ``pyvae._C`` (registers the ``torch.ops.pyvae`` C++ ops), or None."""
    return _EXTENSION


def cpu_cache_bytes() -> int:
    """Bytes of freed CPU output buffers the ``cpu`` backend holds for reuse.

    Its large outputs (gradients, samples: 1 MiB and up) come from a cache like PyTorch's CUDA
    caching allocator, so a training loop does not page-fault fresh memory in on every call; at
    most ``PYVAE_CPU_CACHE_MB`` (environment, read at import; default 1024, 0 turns it off) is
    held. 0 without the extension.
    """
    return _EXTENSION.cpu_cache_bytes() if _EXTENSION is not None else 0


def empty_cpu_cache() -> None:
    """Give every cached CPU output buffer back to the system (see :func:`cpu_cache_bytes`)."""
    if _EXTENSION is not None:
        _EXTENSION.empty_cpu_cache()


# Triton reads TRITON_INTERPRET when its kernels are defined, so pyvae reads it once too, at import.
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _TRITON_INTERPRETED


def triton_usable() -> bool:
    """Triton is installed and has somewhere to run (a CUDA device, or its interpreter)."""
    return _HAS_TRITON and (torch.cuda.is_available() or _TRITON_INTERPRETED)


@functools.lru_cache(maxsize=None)
def triton_kernels(op: str) -> ModuleType | None:
    """Imports ``pyvae.kernels.<op>`` (registering its ``*_triton`` ops); None if that fails.

    Op modules call this when they are imported, so that nothing is imported while torch.compile
    traces a call.
    """
    if not _HAS_TRITON:
        return None
    try:
        return importlib.import_module(f"pyvae.kernels.{op}")
    except Exception as exc:  # a broken Triton install must not break `import pyvae`
        warnings.warn(f"pyvae: the Triton kernels of {op} failed to import ({exc}); backend 'triton' is off")
        _TRITON_BROKEN.add(op)
        return None


_TRITON_BROKEN: set[str] = set()


def load_op_family(op: str, register_fakes: Callable[[], None]) -> None:
    """The last step of importing a ``pyvae.ops`` module: fake kernels for its C++ ops (when the
    extension is built) and its Triton kernels (when Triton has somewhere to run)."""
    if _EXTENSION is not None:
        register_fakes()
    if triton_usable():
        triton_kernels(op)


def available(device: torch.device | str = "cpu", op: str | None = None) -> list[str]:
    """The backends that can serve tensors on ``device`` (for ``op``, if given), in order of
    preference for ``auto``."""
    device = torch.device(device)
    key = (device.type, device.index, len(_TRITON_BROKEN))
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _find_available(device)
    found = _AVAILABLE[key]
    return [b for b in found if b in IMPLEMENTED.get(op, BACKENDS)]


_AVAILABLE: dict[tuple[str, int | None, int], list[str]] = {}

# The GPU kernels use bfloat16 and TF32 tensor-core instructions, which begin with Ampere.
MIN_CUDA_CAPABILITY = (8, 0)


def _find_available(device: torch.device) -> list[str]:
    ext = native_extension()
    found = []
    if device.type == "cuda":
        gpu_ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
        if ext is not None and ext.has_cuda and gpu_ok:
            found.append("cuda")
        if _HAS_TRITON and gpu_ok and not _TRITON_BROKEN:
            found.append("triton")
    elif device.type == "cpu":
        if ext is not None:
            found.append("cpu")
        if _HAS_TRITON and _TRITON_INTERPRETED and not _TRITON_BROKEN:
            found.append("triton")
    found.append("torch")
    return found


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend for one call of ``op`` on ``device``; raises ValueError if none fits."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    requested = backend
    if backend == "auto":
        backend = os.environ.get("PYVAE_BACKEND", "auto") or "auto"
        requested = f"auto (PYVAE_BACKEND={backend!r})" if backend != "auto" else "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    usable = available(device, op)
    if backend == "auto":
        if device.type == "cuda":
            preferred = AUTO_CUDA.get(op, "triton")
            for candidate in (preferred, "cuda", "triton"):
                if candidate in usable:
                    return candidate
        return "cpu" if device.type == "cpu" and "cpu" in usable else "torch"
    if backend not in usable:
        raise ValueError(
            f"backend {requested!r} cannot serve tensors on device '{device}' for {op}; available there: {usable}"
            + (" (the triton backend serves CPU tensors only with TRITON_INTERPRET=1)"
               if backend == "triton" and device.type == "cpu" else "")
            + (" (pyvae._C failed to import: rebuild with `pip install --no-build-isolation .`)"
               if backend in ("cpu", "cuda") and native_extension() is None else ""))
    return backend
