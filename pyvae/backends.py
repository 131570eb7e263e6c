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

A package installed without ``pyvae._C``, or a source checkout where it was never built, falls back to
``torch`` quietly (:data:`MISSING` says which, in every message about it). An extension that exists
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

from . import SOURCE_CHECKOUT, registry
from .kernels.contracts import fake_kernel

BACKENDS = ("torch", "cpu", "cuda", "triton")

# The op families (the `op` of resolve/available), in registration order, and the GPU backend
# `auto` picks for each (a lookup table, so that resolve stays plain Python for torch.compile).
FAMILIES = registry.NAMES
AUTO_CUDA = {f.name: f.auto_cuda for f in registry.FAMILIES}

# How to rebuild the extension against the torch installed here (quoted in every message about it).
REBUILD = ("rebuild it against this torch: `pip install --no-build-isolation .` "
           "(`pip install --no-build-isolation -e .` for a checkout), or `./run.sh test`")

# What a pyvae without pyvae._C lacks (quoted in every message about it): a source checkout that was
# never built (an editable install builds the extension into its pyvae/), or a package installed
# without it.
MISSING = (f"this source checkout ({SOURCE_CHECKOUT}) has no built extension pyvae._C "
           "(`pip install --no-build-isolation -e .` or `./run.sh test` builds it into pyvae/)"
           if SOURCE_CHECKOUT is not None else "this pyvae was installed without its extension pyvae._C")


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
    raise ImportError(f"PYVAE_REQUIRE_NATIVE=1, but {MISSING}; {REBUILD}")
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
            # setup.py installs kernels/ as pyvae.kernels, and a checkout binds it (pyvae/__init__.py)
            reason = (f"{exc.name} is not importable (an install without the repository's kernels/? "
                      f"reinstall: `pip install --no-build-isolation .`)")
        else:
            reason = f"{kernels} failed to import ({type(exc).__name__}: {exc})"
        _TRITON_BROKEN[op] = reason
        warnings.warn(f"pyvae: {reason}; backend 'triton' is off for {op}", RuntimeWarning, stacklevel=2)
        return None


# op family -> why its Triton kernels, or its C++ ops' registration, failed (that backend is off for it)
_TRITON_BROKEN: dict[str, str] = {}
_NATIVE_BROKEN: dict[str, str] = {}


# An op's derivative: (setup_context, make_backward) for torch.library.register_autograd, where
# make_backward(backend) gives the backward of the op serving that backend ("cpu" for the C++ op,
# which serves CUDA tensors too, "triton" for its Triton twin), so that it calls that backend's ops.
Derivative = tuple[Callable, Callable[[str], Callable]]


def load_op_family(op: str, reference: dict[str, Callable],
                   derivatives: dict[str, Derivative] | None = None,
                   vmap_rules: dict[str, Callable[[str], Callable]] | None = None,
                   native_kernels: Callable[[], None] | None = None) -> registry.OpFamily:
    """The last step of importing ``pyvae.ops.<op>``: the PyTorch reference of each of its ops (what
    ``family.op(name, "torch")`` returns); when the extension is built, the fake kernel of each of
    its C++ ops, from the family's contract (``pyvae.kernels.contracts.<op>``: its checks, then its
    outputs), and ``native_kernels()``, kernels of its C++ ops written in Python (if any); its
    Triton kernels (when Triton has somewhere to run); and for the C++ ops and their Triton twins
    alike: their derivatives (``derivatives``: an op without one, and every helper op, gets an
    autograd kernel that raises a clear error when asked to differentiate, never silent zeros) and
    their rules under ``torch.vmap`` (``vmap_rules``: op -> make_rule(backend); default: the op
    called on each slice in turn, as a loop would). Returns the family.

    Only a reference that does not match the family's ops raises (a half-registered family): a
    failing fake registration or Triton import turns that backend off for ``op`` and warns, so that
    ``import pyvae`` never stops half-way through an op module.
    """
    family = registry.family(op)
    family.bind_reference(reference)
    if _EXTENSION is not None:
        try:
            contract = importlib.import_module(family.contract)
            for name in family.ops + family.helper_ops:
                torch.library.register_fake(f"pyvae::{name}", fake_kernel(contract, name))
            if native_kernels is not None:
                native_kernels()
        except Exception as exc:
            _NATIVE_BROKEN[op] = f"its fake kernels failed to register ({type(exc).__name__}: {exc})"
            warnings.warn(f"pyvae: {_NATIVE_BROKEN[op]}; backends 'cpu' and 'cuda' are off for {op}",
                          RuntimeWarning, stacklevel=2)
    served = []  # (op name as registered, the backend it serves, the op of the family it is)
    if _EXTENSION is not None and op not in _NATIVE_BROKEN:
        served += [(name, "cpu", name) for name in family.ops + family.helper_ops]
    if triton_usable() and triton_kernels(op) is not None:
        served += [(registry.triton_twin(name), "triton", name) for name in family.ops]
    for name, derivative in (derivatives or {}).items():
        _DERIVATIVES[(op, name)] = derivative
    for registered, backend, name in served:
        _register_derivative(f"pyvae::{registered}", backend, (derivatives or {}).get(name))
        rule = (vmap_rules or {}).get(name)
        torch.library.register_vmap(f"pyvae::{registered}", rule(backend) if rule else loop_vmap_rule(registered))
    return family


def _register_derivative(qualname: str, backend: str, derivative: Derivative | None) -> None:
    """Registers ``derivative`` as the op's autograd formula, or, for an op without one (a helper op,
    an in-place op), an autograd kernel that raises naming the op when asked for a gradient (an
    op without any autograd kernel would silently give zero gradients, with only a warning)."""
    if derivative is not None:
        setup_context, make_backward = derivative
        torch.library.register_autograd(qualname, make_backward(backend), setup_context=setup_context)
        return
    op = _op_overload(qualname)

    def no_derivative(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise RuntimeError(f"{qualname} has no derivative (it is a step inside another pyvae op, whose "
                               f"derivative covers it): differentiate the public pyvae function instead")
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _IMPL_LIBRARY.impl(qualname.split("::")[1], no_derivative, "Autograd")


_IMPL_LIBRARY = torch.library.Library("pyvae", "IMPL")
_DERIVATIVES: dict[tuple[str, str], Derivative] = {}


def differentiable_op(op: str, name: str, backend: str) -> Callable:
    """Op ``name`` of family ``op`` on a concrete ``backend``, as a function autograd and the
    ``torch.func`` transforms differentiate through its registered derivative: what a backward that
    may itself be differentiated calls (``create_graph=True``, ``torch.func.grad`` of a grad, ...).
    The plain op (``registry.family(op).op(name, backend)``) is enough, and cheaper, elsewhere: the
    derivative registered on the op serves autograd, but ``torch.func`` runs only
    ``torch.autograd.Function``s with ``setup_context``. The reference serves ``torch`` as it is."""
    reference = registry.family(op).op(name, "torch")
    if backend == "torch" and not isinstance(reference, torch.library.CustomOpDef):
        return reference  # plain PyTorch, differentiable as it is
    return _op_function(op, name, backend if backend in ("torch", "triton") else "cpu")


def op_in_backward(op: str, name: str, backend: str) -> Callable:
    """What a backward formula calls for op ``name``: :func:`differentiable_op` where its result may
    be differentiated again (grad mode on: ``create_graph=True``; ``torch.func`` transforms active),
    else :func:`plain_op`."""
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return differentiable_op(op, name, backend)
    return plain_op(op, name, backend)


def plain_op(op: str, name: str, backend: str) -> Callable:
    """Op ``name`` of family ``op`` on ``backend`` for a call whose result autograd will not
    differentiate (inside a Function's forward, a first-order backward, under no_grad): dispatched
    below its autograd kernel, whose Python code (``register_autograd``'s) would otherwise run on
    every call only to find that no gradient is needed. The op itself where that guard cannot be
    used: the reference (``torch``, whose likelihood uses torch.func), under torch.compile or
    ``torch.func`` transforms."""
    if backend == "torch" or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return registry.family(op).op(name, backend)
    return _below_autograd(op, name, backend)


@functools.lru_cache(maxsize=None)
def _below_autograd(op: str, name: str, backend: str) -> Callable:
    fn = registry.family(op).op(name, backend)

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args)
    return call


@functools.lru_cache(maxsize=None)
def _op_function(op: str, name: str, backend: str) -> Callable:
    """The op of ``backend`` called through a ``torch.autograd.Function`` with the op's registered
    derivative. A list output of the op (``Tensor[]``) becomes separate outputs of the Function, and
    is rebuilt for the derivative and for the caller, who see the op's own output structure (an op
    of one Tensor, returned bare, is one output of the Function)."""
    callable_op = registry.family(op).op(name, backend)
    setup_context, make_backward = _DERIVATIVES[(op, name)]
    backward = make_backward(backend)
    overload = callable_op._opoverload if isinstance(callable_op, torch.library.CustomOpDef) else callable_op.default
    returns = overload._schema.returns
    is_list = [str(r.type).startswith("List") for r in returns]
    bare = len(returns) == 1 and not is_list[0]  # the op returns its one Tensor, not a tuple

    def nest(flat: tuple) -> tuple:
        flat, nested = list(flat), []
        list_length = len(flat) - (len(is_list) - sum(is_list))
        for listed in is_list:
            nested.append(flat[:list_length] if listed else flat[0])
            del flat[:list_length if listed else 1]
        return tuple(nested)

    class OpFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            flat = []
            outputs = callable_op(*args)
            for out, listed in zip((outputs,) if bare else outputs, is_list):
                flat.extend(out) if listed else flat.append(out)
            return tuple(flat)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, nest(output)[0] if bare else nest(output))

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *nest(grads))

    OpFunction.__name__ = OpFunction.__qualname__ = f"{name}_{backend}_function"
    if bare:
        return lambda *args: nest(OpFunction.apply(*args))[0]
    return lambda *args: nest(OpFunction.apply(*args))


def _op_overload(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def loop_vmap_rule(registered: str) -> Callable:
    """The rule of ``torch.ops.pyvae.<registered>`` under ``torch.vmap`` when it has none of its own:
    the op on each slice in turn, results stacked (what PyTorch's fallback does, without its
    performance warning). A seeded noise op then draws the same noise for every slice, as a loop of
    calls would."""
    op = _op_overload(f"pyvae::{registered}")
    return lambda info, in_dims, *args: map_slices(op, info.batch_size, args, in_dims)


def map_slices(op: Callable, batch_size: int, args: tuple, in_dims: tuple):
    """``op`` on each of ``batch_size`` slices of ``args`` (each sliced along its entry of ``in_dims``,
    an int, or passed whole), results stacked along dim 0: (outputs, out_dims) as a vmap rule returns."""
    outputs = [op(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
               for i in range(batch_size)]
    return stack_outputs(outputs)


def stack_outputs(outputs: list):
    """Per-slice op outputs (a tensor, or tuples of tensors and lists of tensors) stacked along a new
    dim 0; returns (stacked, out_dims) as a vmap rule does."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs), 0
    if first is None:
        return None, None
    if isinstance(first, (tuple, list)):
        parts = [stack_outputs([o[j] for o in outputs]) for j in range(len(first))]
        return type(first)(p[0] for p in parts), type(first)(p[1] for p in parts)
    raise TypeError(f"cannot stack outputs of type {type(first).__name__} under vmap")


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


@torch.compiler.assume_constant_result  # traced as its value: no guard on the lazily filled cache below
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
            + (f" ({MISSING})"
               if backend in ("cpu", "cuda") and _EXTENSION is None and _EXTENSION_ERROR is None else ""))
    return backend
