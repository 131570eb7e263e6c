"""pyvae's layers use each other through public names only: no module imports a private name
(``_x``) of another module, nor a private module (``pyvae/<package>/_x.py``) of another package.
Read from the source (the repository's pyvae/ and kernels/), so it holds for the checkout."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Private modules that other packages share on purpose: the constants the backends share (read from
# pyvae._C), and the Triton side's input checks and launch layouts, which the ops also use for their
# fake kernels and the CUDA statistics (to become the per-family contract modules of issue #20).
SHARED_PRIVATE_MODULES = {"pyvae._constants", "pyvae.kernels._layout"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, kernels/ as pyvae.kernels (as installed)."""
    found = {}
    for path in sorted((REPO / "pyvae").rglob("*.py")):
        found[".".join(path.relative_to(REPO).with_suffix("").parts)] = path
    for path in sorted((REPO / "kernels").glob("*.py")):
        found["pyvae.kernels." + path.stem] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(module, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports() -> list[str]:
    """'file:line: what' for each import that crosses into another module's private names."""
    problems = []
    for module, path in _modules().items():
        package = _package(module, path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(module, path, node)
            if not source.startswith("pyvae"):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            private = [p for p in source.split(".") if p.startswith("_") and p != "__init__"]
            if private and source.rpartition(".")[0] != package and source not in SHARED_PRIVATE_MODULES \
                    and source != "pyvae._C":
                problems.append(f"{where}: imports the private module {source}")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    problems.append(f"{where}: imports the private name {alias.name} from {source}")
    return problems


def test_no_private_imports_across_modules():
    assert private_imports() == []


def test_the_check_finds_private_imports(tmp_path, monkeypatch):
    # the check itself can fail: a layer importing a private helper of the ops is found
    fake = tmp_path / "pyvae" / "nn"
    fake.mkdir(parents=True)
    (tmp_path / "pyvae" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "layer.py").write_text("from ..ops._common import reduce_rows\nfrom ..ops.vq import _helper\n")
    (tmp_path / "kernels").mkdir()
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    found = private_imports()
    assert found == ["pyvae/nn/layer.py:1: imports the private module pyvae.ops._common",
                     "pyvae/nn/layer.py:2: imports the private name _helper from pyvae.ops.vq"]
