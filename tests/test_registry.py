"""Every op family of pyvae.registry is registered in full, and nothing is registered outside it:
its ops (C++ schemas, contracts, fake kernels, Triton twins), its op module, its autograd Functions,
its benchmark, its tests and its cases of the shared tests and GPU checks. A family added in part
fails here, naming what is missing (:func:`missing_parts`, tried on a throwaway family below); and
no shared file names a family: each is found through the registry."""
import ast
import importlib
import io
import os
import re
import tokenize
from glob import glob

import pytest
import torch

from pyvae import backends, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = pytest.mark.parametrize("family", registry.FAMILIES, ids=registry.NAMES)


def _read(path: str, root: str = REPO) -> str:
    """The text of a file of the repository (or of another tree laid out like it)."""
    with open(os.path.join(root, path)) as f:
        return f.read()


def _top_level_names(path: str, root: str = REPO) -> set[str]:
    """Names of the functions, classes and variables a Python file defines at its top level."""
    names = set()
    for node in ast.parse(_read(path, root)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _bad_call_ops(path: str, root: str = REPO) -> set[str]:
    """The ops that a families/<name>.py's BAD_CALLS calls (the first item of each entry)."""
    for node in ast.parse(_read(path, root)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BAD_CALLS" for t in node.targets):
            return {entry.elts[0].value for entry in node.value.elts if isinstance(entry, ast.Tuple)}
    return set()


def missing_parts(family: registry.OpFamily, root: str = REPO) -> list[str]:
    """What of ``family``'s own files (pyvae/registry.py's docstring lists them) is missing under
    ``root``, or lacks a definition the shared code looks up by name; empty when it is whole."""
    def has(path: str, *names: str) -> list[str]:
        if not os.path.exists(os.path.join(root, path)):
            return [f"{path} (file)"]
        return [f"{path}: {name}" for name in names if name not in _top_level_names(path, root)]

    name = family.name
    missing = has(f"pyvae/ops/{name}.py", "_OP", "_FAMILY", *family.functions)
    missing += has(f"kernels/{name}.py", *family.triton_ops)
    contract = f"kernels/contracts/{name}.py"
    missing += has(contract, *(f"check_{op}" for op in family.ops + family.helper_ops),
                   *(f"new_{op}_outputs" for op in family.ops + family.helper_ops if not op.endswith("_")))
    for path in (f"csrc/{name}_ops.cpp", f"csrc/cpu/{name}.cpp", f"csrc/cuda/{name}.cu", *family.test_files):
        missing += [] if os.path.exists(os.path.join(root, path)) else [f"{path} (file)"]
    missing += has(f"bench/{family.bench}.py", "run", "n_cases")
    if family.tune:
        missing += [] if os.path.exists(os.path.join(root, "bench", f"{family.tune}.py")) else [f"bench/{family.tune}.py"]
    cases = "tests/" + family.cases.replace(".", "/") + ".py"  # imported from tests/
    missing += has(cases, "BAD_CALLS", "PROPERTY_EXAMPLES", "property_case", "example", "sanitize", "triton_launches")
    if not missing:
        missing += [f"{cases}: BAD_CALLS of {op}" for op in family.ops if op not in _bad_call_ops(cases, root)]
    return missing


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


def test_every_registered_op_belongs_to_a_family():
    declared = {op for f in registry.FAMILIES for op in f.ops + f.helper_ops + f.python_ops + f.triton_ops}
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyvae::")}
    assert names <= declared, "ops in torch.ops.pyvae that no family of pyvae.registry declares"


@FAMILIES
def test_the_family_has_all_its_files(family):
    assert missing_parts(family) == []


def test_op_dispatch_per_backend():
    if backends.native_extension() is None or not backends.triton_usable():
        pytest.skip("needs the extension and Triton")
    family, other = registry.FAMILIES[-1], registry.FAMILIES[0]
    op = family.ops[0]
    assert family.op(op, "cpu") is getattr(torch.ops.pyvae, op)
    assert family.op(op, "cuda") is getattr(torch.ops.pyvae, op)
    assert family.op(op, "triton") is getattr(torch.ops.pyvae, registry.triton_twin(op))
    assert registry.triton_twin("scale_") == "scale_triton_"
    with pytest.raises(KeyError, match=f"no op '{other.ops[0]}'"):
        family.op(other.ops[0], "cpu")
    with pytest.raises(ValueError, match="the families are " + ", ".join(registry.NAMES)):
        registry.family("no_such_family")


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
    importlib.import_module(family.cases).sanitize("cpu", trim=True)


# ------------------------------------------------------------------------------ one family, one place
# The shared machinery: it finds the families through the registry and names none of them (nor any
# of their ops). The registry's FAMILIES and the package's exports are the places that do.
SHARED_FILES = ["pyvae/backends.py", "pyvae/__main__.py", "pyvae/ops/_common.py", "kernels/__init__.py",
                "kernels/_layout.py", "kernels/contracts/__init__.py", "tests/test_backends.py",
                "tests/test_properties.py", "tests/test_registry.py", "tests/cases.py", "tests/tolerances.py",
                "tests/transforms.py", "tests/probes.py", "tests/conftest.py", "tests/families/__init__.py",
                "tests/cuda_sanitize_cases.py", "tests/triton_gpu_compile.py", "bench/run.py", "bench/harness.py"]


def _family_names_in(path: str) -> list[str]:
    """Identifiers and whole string literals of a Python file that are a family's or an op's name."""
    names = set(registry.NAMES)
    for f in registry.FAMILIES:
        names.update(f.ops + f.helper_ops + f.python_ops + f.triton_ops)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(_read(path)).readline):
        value = tok.string
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
        if tok.type in (tokenize.NAME, tokenize.STRING) and value in names:
            found.append(f"{path}:{tok.start[0]}: {tok.string}")
    return found


def test_no_shared_file_names_a_family():
    assert [hit for path in SHARED_FILES for hit in _family_names_in(path)] == []


def test_the_shared_file_list_is_what_the_tree_has():
    for path in SHARED_FILES:
        assert os.path.exists(os.path.join(REPO, path)), path


# A throwaway family, written file by file as a contributor would: each step is caught until the
# family is whole (the path of "Adding an op family" in ARCHITECTURE.md).
_TOY = registry.OpFamily("toy", ops=("toy_forward", "toy_scale_"), functions=("ToyFunction",),
                         helper_ops=("toy_helper",))
_TOY_FILES = [
    ("pyvae/ops/toy.py", '_OP = "toy"\nclass ToyFunction: ...\n_FAMILY = None\n'),
    ("kernels/toy.py", "def toy_forward_triton(): ...\ndef toy_scale_triton_(): ...\n"),
    # the contract: the in-place op returns nothing, so it has no new_..._outputs
    ("kernels/contracts/toy.py", "def check_toy_forward(): ...\ndef check_toy_scale_(): ...\n"
                                 "def check_toy_helper(): ...\ndef new_toy_forward_outputs(): ...\n"
                                 "def new_toy_helper_outputs(): ...\n"),
    ("csrc/toy_ops.cpp", ""), ("csrc/cpu/toy.cpp", ""), ("csrc/cuda/toy.cu", ""),
    ("bench/toy.py", "def run(): ...\ndef n_cases(): ...\n"),
    ("tests/test_toy.py", ""),
    ("tests/families/toy.py", "BAD_CALLS = [('toy_forward', None, ValueError, ''), ('toy_scale_', None, ValueError, '')]\n"
                              "PROPERTY_EXAMPLES = (1, 1)\ndef property_case(): ...\ndef example(): ...\n"
                              "def sanitize(): ...\ndef triton_launches(): ...\n"),
]


def test_a_throwaway_family_is_caught_at_each_missing_file(tmp_path):
    for path, text in _TOY_FILES:
        assert any(m.startswith(path) for m in missing_parts(_TOY, str(tmp_path))), path
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert missing_parts(_TOY, str(tmp_path)) == []
    # and at each missing definition the shared code looks up
    for path, definition, missing in [
            ("kernels/contracts/toy.py", "def new_toy_forward_outputs(): ...\n", "new_toy_forward_outputs"),
            ("kernels/toy.py", "def toy_scale_triton_(): ...\n", "toy_scale_triton_"),
            ("tests/families/toy.py", "def example(): ...\n", "example"),
            ("tests/families/toy.py", ", ('toy_scale_', None, ValueError, '')", "BAD_CALLS of toy_scale_")]:
        whole = (tmp_path / path).read_text()
        (tmp_path / path).write_text(whole.replace(definition, ""))
        assert missing_parts(_TOY, str(tmp_path)) == [f"{path}: {missing}"]
        (tmp_path / path).write_text(whole)

