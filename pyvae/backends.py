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
that op (its family's ``auto_cuda`` in :mod:`pyvae.registry`), for CPU tensors ``cpu``; ``torch``
where the extension is missing.

A package installed without ``pyvae._C`` falls back to ``torch`` quietly. An extension that exists
but fails to load (built against another torch, an undefined symbol) warns once at import, with the
cause and the rebuild command; ``PYVAE_REQUIRE_NATIVE=1`` makes both cases an ImportError. A Triton
module that fails to import turns off the ``triton`` backend of its op family alone.
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

from . import registry

BACKENDS = ("torch", "cpu", "cuda", "triton")

# The op families (the `op` of resolve/available), in registration order, and the GPU backend
# `auto` picks for each (a lookup table, so that resolve stays plain Python for torch.compile).
FAMILIES = registry.NAMES
AUTO_CUDA = {f.name: f.auto_cuda for f in registry.FAMILIES}

# How to rebuild the extension against the torch installed here (quoted in every message about it).
REBUILD = ("rebuild it against this torch: `pip install --no-build-isolation .` "
           "(`pip install --no-build-isolation -e .` for a checkout), or `./run.sh test`")


def _load_extension() -> tuple[ModuleType | None, str | None]:
    """(the extension, None), or (None, why it is unusable) when it exists but fails to load, or
    (None, None) when this package was installed without it (the one quiet fallback)."""
    try:
        return importlib.import_module("pyvae._C"), None
    except ModuleNotFoundError as exc:
        if exc.name == "pyvae._C":
            return None, None
        error = exc
    except (ImportError, OSError) as exc:  # built against another torch, an undefined symbol, ...
        error = exc
    return None, f"{type(error).__name__}: {error}"


def _require_native() -> bool:
    return os.environ.get("PYVAE_REQUIRE_NATIVE", "0") not in ("", "0")


# Looked up once at import, so that backend resolution is plain Python that torch.compile traces.
_EXTENSION, _EXTENSION_ERROR = _load_extension()
if _EXTENSION_ERROR is not None:
    if _require_native():
        raise ImportError(f"pyvae._C failed to load ({_EXTENSION_ERROR}); {REBUILD}. "
                          "(PYVAE_REQUIRE_NATIVE=1 makes this an error.)")
    warnings.warn(f"pyvae._C failed to load ({_EXTENSION_ERROR}): the cpu and cuda backends are off and "
                  f"backend='auto' falls back to 'torch'; {REBUILD}", RuntimeWarning)
elif _EXTENSION is None and _require_native():
    raise ImportError(f"PYVAE_REQUIRE_NATIVE=1, but this pyvae was installed without its extension pyvae._C; "
                      f"{REBUILD}")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def native_extension_error() -> str | None:
    """Why ``pyvae._C`` exists but failed to load (the exception), or None (loaded, or never built)."""
    return _EXTENSION_ERROR


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
    """Imports the Triton kernels of op family ``op`` (registering its ``*_triton`` ops); None if
    that fails, which turns the triton backend off for ``op`` alone (with a warning saying why).

    Op modules call this when they are imported, so that nothing is imported while torch.compile
    traces a call.
    """
    if not _HAS_TRITON:
        return None
    kernels = registry.family(op).kernels
    try:
        return importlib.import_module(kernels)
    except Exception as exc:  # a broken Triton install must not break `import pyvae`
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("pyvae.kernels", kernels):
            # kernels/ is installed as pyvae.kernels by setup.py; a bare checkout has no such package
            reason = (f"{exc.name} is not importable (a source checkout without an install? "
                      f"`pip install --no-build-isolation -e .` installs kernels/ as pyvae.kernels)")
        else:
            reason = f"{kernels} failed to import ({type(exc).__name__}: {exc})"
        _TRITON_BROKEN[op] = reason
        warnings.warn(f"pyvae: {reason}; backend 'triton' is off for {op}", RuntimeWarning, stacklevel=2)
        return None


# op family -> why its Triton kernels, or its C++ ops' registration, failed (that backend is off for it)
_TRITON_BROKEN: dict[str, str] = {}
_NATIVE_BROKEN: dict[str, str] = {}


def load_op_family(op: str, register_native: Callable[[], None], reference: dict[str, Callable]) -> registry.OpFamily:
    """The last step of importing ``pyvae.ops.<op>``: the PyTorch reference of each of its ops (what
    ``family.op(name, "torch")`` returns), what its C++ ops need registered from Python (their fake
    kernels: ``register_native``, when the extension is built) and its Triton kernels (when Triton
    has somewhere to run). Returns the family.

    Only a reference that does not match the family's ops raises (a half-registered family): a
    failing fake registration or Triton import turns that backend off for ``op`` and warns, so that
    ``import pyvae`` never stops half-way through an op module.
    """
    family = registry.family(op)
    family.bind_reference(reference)
    if _EXTENSION is not None:
        try:
            register_native()
        except Exception as exc:
            _NATIVE_BROKEN[op] = f"its fake kernels failed to register ({type(exc).__name__}: {exc})"
            warnings.warn(f"pyvae: {_NATIVE_BROKEN[op]}; backends 'cpu' and 'cuda' are off for {op}",
                          RuntimeWarning, stacklevel=2)
    if triton_usable():
        triton_kernels(op)
    return family


def unavailable_reasons(op: str) -> dict[str, str]:
    """Backend -> why it cannot serve ``op`` on this install although it could have (a broken
    extension, a Triton module that failed to import); empty when nothing failed."""
    reasons = {}
    native = _NATIVE_BROKEN.get(op) or (f"pyvae._C failed to load ({_EXTENSION_ERROR})" if _EXTENSION_ERROR else None)
    if native:
        reasons["cpu"] = reasons["cuda"] = native
    if op in _TRITON_BROKEN:
        reasons["triton"] = _TRITON_BROKEN[op]
    return reasons


def available(device: torch.device | str = "cpu", op: str | None = None) -> list[str]:
    """The backends that can serve tensors on ``device`` (for ``op``, if given: without it, those
    that serve at least one op family), in order of preference for ``auto``."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _find_available(device)
    found = _AVAILABLE[key]
    if op is None:
        return [b for b in found if len(_broken(b)) < len(FAMILIES)]
    return [b for b in found if op not in _broken(b)]


def _broken(backend: str) -> dict[str, str]:
    return _TRITON_BROKEN if backend == "triton" else _NATIVE_BROKEN if backend in ("cpu", "cuda") else {}


_AVAILABLE: dict[tuple[str, int | None], list[str]] = {}

# The GPU kernels use bfloat16 and TF32 tensor-core instructions, which begin with Ampere.
MIN_CUDA_CAPABILITY = (8, 0)


def _find_available(device: torch.device) -> list[str]:
    ext = native_extension()
    found = []
    if device.type == "cuda":
        gpu_ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
        if ext is not None and ext.has_cuda and gpu_ok:
            found.append("cuda")
        if _HAS_TRITON and gpu_ok:
            found.append("triton")
    elif device.type == "cpu":
        if ext is not None:
            found.append("cpu")
        if _HAS_TRITON and _TRITON_INTERPRETED:
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
            + (f" ({backend!r} is off: {unavailable_reasons(op)[backend]}"
               + (f"; {REBUILD})" if backend != "triton" and _EXTENSION_ERROR else ")")
               if backend in unavailable_reasons(op) else "")
            + (" (this pyvae was installed without its extension pyvae._C)"
               if backend in ("cpu", "cuda") and _EXTENSION is None and _EXTENSION_ERROR is None else ""))
    return backend
