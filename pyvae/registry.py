"""pyvae's op families, each declared here once, in :data:`FAMILIES`.

Everything that lists op families iterates over :data:`FAMILIES`: :mod:`pyvae.backends` (which
backends serve each family), ``python -m pyvae``, the benchmark runner ``bench/run.py``,
``bench/gpu_check.sh``, the Triton GPU-compile check ``tests/triton_gpu_compile.py``, the
compute-sanitizer cases ``tests/cuda_sanitize_cases.py`` and the tests every family goes through
(bad calls, properties). ``tests/test_registry.py`` fails if a family is registered only in part.

A family named ``<name>`` lives in files of its own, found by these names:

    pyvae/ops/<name>.py           reference, autograd Function(s) and API;
                                  sets ``_OP = "<name>"`` and ends with ``backends.load_op_family(...)``
    kernels/<name>.py             its Triton kernels: the ``triton_twin`` of each op (``pyvae.kernels.<name>``)
    kernels/contracts/<name>.py   its ops' contract: ``check_<op>`` and ``new_<op>_outputs`` of each op,
                                  used by the fake kernels, the Triton twins and the torch backend
    csrc/<name>_ops.cpp, csrc/cpu/<name>.cpp, csrc/cuda/<name>.cu
                                  its C++ ops (CMakeLists.txt finds them by pattern)
    bench/<name>.py               its benchmark (``run`` and ``n_cases``, run by bench/run.py)
    tests/test_<name>.py          its tests (plus ``tests``)
    tests/families/<name>.py      its cases of the tests every family goes through (bad calls,
                                  property cases) and of the GPU checks (a small run of each CUDA kernel
                                  for compute-sanitizer, every Triton kernel variant its launchers ask for)

This module imports nothing of pyvae, so that :mod:`pyvae.backends` can import it and shell scripts
can run it: ``python pyvae/registry.py ATTRIBUTE [NAME...]`` prints that attribute of the named
families (default: all), one value per line (see :func:`main`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch


def triton_twin(op: str) -> str:
    """The Triton op serving ``torch.ops.pyvae.<op>``: ``<op>_triton``, an in-place op keeping its
    trailing underscore last (``scale_grad_`` -> ``scale_grad_triton_``)."""
    return op[:-1] + "_triton_" if op.endswith("_") else op + "_triton"


@dataclass(frozen=True)
class OpFamily:
    """One op family: its name (which names its files, see the module docstring) and what those
    files must define."""

    name: str
    ops: tuple[str, ...]
    """Its C++ ops, ``torch.ops.pyvae.<op>`` (CPU and CUDA), each with a fake kernel and a Triton twin."""
    functions: tuple[str, ...]
    """Its ``torch.autograd.Function`` classes in ``pyvae.ops.<name>``."""
    helper_ops: tuple[str, ...] = ()
    """C++ ops that a kernel of one of its ops calls (with a fake kernel; no Triton twin, no reference)."""
    python_ops: tuple[str, ...] = ()
    """Custom ops it defines in Python (``torch.library.custom_op``), e.g. for torch.compile's sake."""
    tests: tuple[str, ...] = ()
    """Test files of its own beyond ``tests/test_<name>.py`` (e.g. its layer's)."""
    tune: str | None = None
    """A script in bench/ that sweeps its Triton block sizes on a GPU (run by bench/gpu_check.sh)."""
    auto_cuda: str = "triton"
    """What ``backend="auto"`` picks for CUDA tensors: the GPU backend the benchmark measured faster."""
    _reference: dict[str, Callable] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def module(self) -> str:
        return f"pyvae.ops.{self.name}"

    @property
    def kernels(self) -> str:
        return f"pyvae.kernels.{self.name}"

    @property
    def contract(self) -> str:
        """Its ops' contract: input checks and outputs (``kernels/contracts/<name>.py``, see
        :mod:`pyvae.kernels.contracts`)."""
        return f"pyvae.kernels.contracts.{self.name}"

    @property
    def bench(self) -> str:
        """Its benchmark module, imported from bench/ (bench/<name>.py)."""
        return self.name

    @property
    def test_files(self) -> tuple[str, ...]:
        return (f"tests/test_{self.name}.py", *self.tests)

    @property
    def cases(self) -> str:
        """Its cases of the tests and checks every family goes through (tests/families/<name>.py,
        imported from tests/; see tests/families/__init__.py): bad calls, property cases, and the
        GPU checks' ``sanitize`` (compute-sanitizer) and ``triton_launches`` (Triton GPU compile)."""
        return f"families.{self.name}"

    @property
    def triton_ops(self) -> tuple[str, ...]:
        return tuple(triton_twin(op) for op in self.ops)

    def bind_reference(self, reference: dict[str, Callable]) -> None:
        """Sets the PyTorch reference of each op (same signature as the op), once, when
        ``pyvae.ops.<name>`` is imported; every op must have one."""
        if set(reference) != set(self.ops):
            raise ValueError(f"op family {self.name!r}: references given for {sorted(reference)}, "
                             f"but its ops are {sorted(self.ops)}")
        self._reference.update(reference)

    def op(self, name: str, backend: str) -> Callable:
        """The callable that serves op ``name`` on a concrete ``backend``, with the registered op's
        signature: the PyTorch reference for ``"torch"``, ``torch.ops.pyvae.<name>_triton`` for
        ``"triton"``, ``torch.ops.pyvae.<name>`` for ``"cpu"`` and ``"cuda"``. Plain lookups, which
        torch.compile traces."""
        if backend == "torch":
            return self._reference[name]
        if name not in self.ops:
            raise KeyError(f"op family {self.name!r} has no op {name!r} (its ops: {', '.join(self.ops)})")
        return getattr(torch.ops.pyvae, triton_twin(name) if backend == "triton" else name)


# In registration order (the order of reports and benchmark runs).
FAMILIES: tuple[OpFamily, ...] = (
    OpFamily("reparam_kl", ops=("reparam_kl_forward", "reparam_kl_backward", "reparam_kl_packed_forward",
                                "reparam_kl_packed_backward"), functions=("ReparamKLFunction", "PackedReparamKLFunction"),
             python_ops=("philox_normal",), tests=("tests/test_reparam_kl_packed.py",)),
    OpFamily("likelihood", ops=("likelihood_forward", "scale_grad_"), functions=("LikelihoodFunction",)),
    OpFamily("vq", ops=("nearest_code", "codebook_stats"), functions=("VQFunction",),
             helper_ops=("codebook_chunk_sums",),
             python_ops=("codebook_snapshot", "nearest_code_reference", "codebook_stats_reference"),
             tests=("tests/test_vq_layer.py",), tune="tune_vq_triton"),
    OpFamily("dmol", ops=("dmol_forward", "dmol_sample"), functions=("DMOLFunction",)),
    OpFamily("fsq", ops=("fsq_forward", "fsq_backward"), functions=("FSQFunction",)),
    OpFamily("rvq", ops=("residual_code",), functions=("ResidualVQFunction",),
             python_ops=("residual_code_reference",), tests=("tests/test_rvq_layer.py", "tests/test_rvq_triton.py")),
)

NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
_BY_NAME = {f.name: f for f in FAMILIES}


def family(name: str) -> OpFamily:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown op family {name!r}; the families are {', '.join(NAMES)}") from None


def main(argv: list[str]) -> int:
    """``registry.py ATTRIBUTE [NAME...]``: each value of ``ATTRIBUTE`` (``name``, ``test_files``,
    ``tune``, ...) of the named families (default: all), one per line; none for an empty one."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python pyvae/registry.py ATTRIBUTE [NAME...]   (e.g. `name`, `test_files vq`)")
        return 0 if argv else 2
    attribute, names = argv[0], argv[1:] or list(NAMES)
    try:
        chosen = [family(n) for n in names]
    except ValueError as exc:
        print(f"registry.py: {exc}", file=sys.stderr)
        return 2
    if not hasattr(FAMILIES[0], attribute) or attribute.startswith("_"):
        print(f"registry.py: an op family has no attribute {attribute!r}", file=sys.stderr)
        return 2
    for fam in chosen:
        value = getattr(fam, attribute)
        for item in value if isinstance(value, tuple) else [value] if value is not None else []:
            print(item)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
