"""Every op family of pyvae.registry is registered in full, and nothing is registered outside it:
its ops (C++ schemas, fake kernels, Triton twins), its op module, its autograd Functions, its
benchmark, its tests and its cases in the GPU checks. A family added in part fails here, naming
what is missing."""
import ast
import importlib
import os
import re
from glob import glob

import pytest
import torch

from pyvae import backends, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = pytest.mark.parametrize("family", registry.FAMILIES, ids=registry.NAMES)


def _read(path: str) -> str:
    """The text of a file of the repository."""
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def _functions(path: str) -> set[str]:
    """Names of the top-level functions a Python file of the repository defines."""
    return {node.name for node in ast.parse(_read(path)).body if isinstance(node, ast.FunctionDef)}


def _op_modules() -> dict[str, str]:
    """pyvae/ops/*.py file -> the value of its module-level ``_OP``, for those that set one."""
    found = {}
    for path in sorted(glob(os.path.join(REPO, "pyvae", "ops", "*.py"))):
        for node in ast.parse(_read(path)).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_OP" for t in node.targets):
                found[os.path.basename(path)] = ast.literal_eval(node.value)
    return found


def test_every_op_module_is_a_registered_family():
    assert sorted(_op_modules().values()) == sorted(registry.NAMES), (
        "each pyvae/ops module with an _OP is one family of pyvae.registry.FAMILIES, and each family has one")
    assert all(file == f"{op}.py" for file, op in _op_modules().items())


@FAMILIES
def test_op_module_binds_a_reference_and_defines_its_functions(family):
    module = importlib.import_module(family.module)
    for name in family.functions:
        assert issubclass(getattr(module, name), torch.autograd.Function), name
    for op in family.ops:
        assert callable(family.op(op, "torch")), op


@FAMILIES
def test_cpp_ops_are_the_schemas_of_its_binding_file(family):
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', _read(f"csrc/{family.name}_ops.cpp"))
    assert sorted(schemas) == sorted(family.ops + family.helper_ops)


@FAMILIES
def test_triton_twins_are_the_ops_of_its_kernels_module(family):
    twins = re.findall(r'triton_op\(\s*"pyvae::(\w+)"', _read(f"kernels/{family.name}.py"))
    assert sorted(twins) == sorted(family.triton_ops)


@FAMILIES
def test_registered_ops_have_fake_kernels(family):
    """Every op the registry names exists in torch.ops.pyvae with a fake (Meta) kernel, so that
    torch.compile and torch.library.opcheck can trace it."""
    importlib.import_module(family.module)
    ops = list(family.python_ops)
    if backends.native_extension() is not None:
        ops += family.ops + family.helper_ops
    if backends.triton_usable():
        importlib.import_module(family.kernels)
        ops += family.triton_ops
    for op in ops:
        assert hasattr(torch.ops.pyvae, op), f"torch.ops.pyvae.{op} is not registered"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyvae::{op}", "Meta"), f"pyvae::{op} has no fake kernel"


def test_every_op_has_an_autograd_kernel():
    """An op without one is differentiated as a constant: zero gradients, with only PyTorch's
    warning. Every op in torch.ops.pyvae has a derivative, or a kernel that raises naming it."""
    for family in registry.FAMILIES:
        importlib.import_module(family.module)
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyvae::"))
    assert names
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "Autograd")]
    assert not missing, f"ops without an autograd kernel: {missing}"


@pytest.mark.skipif(backends.native_extension() is None, reason="extension not built")
def test_an_op_without_a_derivative_raises_naming_it():
    grad = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="pyvae::scale_grad_ has no derivative"):
        torch.ops.pyvae.scale_grad_(grad * 1.0, torch.ones(()))
    buffer = torch.full((4,), 2.0)
    torch.ops.pyvae.scale_grad_(buffer, torch.full((), 3.0))  # without a gradient to take it runs
    assert torch.equal(buffer, torch.full((4,), 6.0))


def test_every_registered_op_belongs_to_a_family():
    declared = {op for f in registry.FAMILIES for op in f.ops + f.helper_ops + f.python_ops + f.triton_ops}
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyvae::")}
    assert names <= declared, "ops in torch.ops.pyvae that no family of pyvae.registry declares"


@FAMILIES
def test_benchmark_tests_and_gpu_checks_cover_the_family(family):
    assert {"run", "n_cases"} <= _functions(f"bench/{family.bench}.py")
    if family.tune:
        assert os.path.exists(os.path.join(REPO, "bench", f"{family.tune}.py"))
    for path in family.test_files:
        assert os.path.exists(os.path.join(REPO, path)), path
    gpu_cases = "tests/" + family.gpu_cases.replace(".", "/") + ".py"  # imported from tests/
    assert {"sanitize", "triton_launches"} <= _functions(gpu_cases), gpu_cases


def test_op_dispatch_per_backend():
    if backends.native_extension() is None or not backends.triton_usable():
        pytest.skip("needs the extension and Triton")
    family = registry.family("vq")
    assert family.op("nearest_code", "cpu") is torch.ops.pyvae.nearest_code
    assert family.op("nearest_code", "cuda") is torch.ops.pyvae.nearest_code
    assert family.op("codebook_stats", "triton") is torch.ops.pyvae.codebook_stats_triton
    assert registry.triton_twin("scale_grad_") == "scale_grad_triton_"
    with pytest.raises(KeyError, match="no op 'likelihood_forward'"):
        family.op("likelihood_forward", "cpu")
    with pytest.raises(ValueError, match="the families are reparam_kl, likelihood, vq"):
        registry.family("residual_vq")


def test_a_reference_must_cover_the_family_ops():
    family = registry.OpFamily("toy", ops=("toy_forward", "toy_backward"), functions=())
    with pytest.raises(ValueError, match="its ops are"):
        family.bind_reference({"toy_forward": lambda: None})


@FAMILIES
def test_sanitizer_cases_run_on_the_cpu_backend(family):
    """The cases compute-sanitizer runs on a GPU, run here on the cpu backend (trimmed): they call
    the family's API as it is now."""
    if "cpu" not in backends.available("cpu", family.name):
        pytest.skip("needs the extension")
    torch.manual_seed(0)
    importlib.import_module(family.gpu_cases).sanitize("cpu", trim=True)
