"""No silent fallbacks: a broken extension, a source checkout with or without a build, a Triton
module that fails to import, and Triton ops called directly with bad inputs.

The import cases run in fresh processes; they fake the extension's state with an import hook
(so they work the same on an editable and a normal install) and import pyvae from wherever it is
installed, except the source-checkout case, which imports a copy of the source tree with every
installed pyvae hidden.
"""
import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pyvae import backends, registry

from families import OnCPU

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# Prepended to each child's code: an import hook that makes `pyvae._C` load from a given file (a text
# file named like the extension: a real dlopen failure), or be absent (an install without it).
_HOOK = textwrap.dedent("""
    import importlib.abc, importlib.util, os, sys, warnings
    MODE, FAKE = sys.argv[1], sys.argv[2]
    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pyvae._C" and MODE == "broken":
                return importlib.util.spec_from_file_location(name, FAKE)
            if name == "pyvae._C" and MODE == "absent":
                raise ModuleNotFoundError("No module named 'pyvae._C'", name=name)
            broken = os.environ.get("PYVAE_TEST_BROKEN_TRITON")
            if MODE == "triton_broken" and name == f"pyvae.kernels.{broken}":
                raise RuntimeError(f"simulated: this Triton cannot compile {broken}")
            return None
    sys.meta_path.insert(0, Hook())
    warnings.simplefilter("always")
""")


def _run(mode, code, tmp_path, **env):
    fake = tmp_path / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    fake.write_text("not a shared object, but named like one\n" * 8)  # long enough for an ELF header
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYVAE_REQUIRE_NATIVE", "PYVAE_BACKEND")}
    full_env.update(TRITON_INTERPRET="1", **env)
    return subprocess.run([sys.executable, "-c", _HOOK + textwrap.dedent(code), mode, str(fake)], capture_output=True,
                          text=True, cwd=tmp_path, env=full_env, timeout=120)


def test_a_broken_extension_warns_once_with_the_cause_and_the_rebuild_command(tmp_path):
    name = registry.NAMES[-1]
    done = _run("broken", f"""
        import pyvae, torch
        print("AVAILABLE", pyvae.backends.available("cpu", {name!r}))
        print("AUTO", pyvae.backends.resolve("auto", torch.device("cpu"), {name!r}))
        try:
            pyvae.backends.resolve("cpu", torch.device("cpu"), {name!r})
        except ValueError as exc:
            print("RESOLVE", exc)
        import pyvae.__main__
        pyvae.__main__.report()
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 1, done.stderr  # once, however many op modules look at the extension
    assert "pyvae._C failed to load" in warned[0] and "pip install --no-build-isolation" in warned[0]
    assert "invalid ELF header" in warned[0] and "_C" in warned[0]  # the loader's own words
    assert "AVAILABLE " + str([b for b in backends.available("cpu", name) if b != "cpu"]) in done.stdout
    assert "AUTO torch" in done.stdout
    resolve_line = next(line for line in done.stdout.splitlines() if line.startswith("RESOLVE"))
    assert "failed to load" in resolve_line and "pip install --no-build-isolation" in resolve_line
    assert "extension pyvae._C: FAILED TO LOAD" in done.stdout and "./run.sh test" in done.stdout


def test_require_native_turns_a_broken_or_missing_extension_into_an_import_error(tmp_path):
    for mode, words in (("broken", "failed to load"), ("absent", backends.MISSING)):
        done = _run(mode, "import pyvae", tmp_path, PYVAE_REQUIRE_NATIVE="1")
        assert done.returncode != 0, mode
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError") and words in last and "pip install --no-build-isolation" in last, (
            mode, done.stderr[-2000:])
    done = _run("absent", "import pyvae", tmp_path, PYVAE_REQUIRE_NATIVE="0")
    assert done.returncode == 0, done.stderr


def test_an_install_without_the_extension_falls_back_quietly_and_says_so(tmp_path):
    done = _run("absent", """
        import warnings
        warnings.simplefilter("error")  # any warning fails the import
        import pyvae, pyvae.__main__
        print("AVAILABLE", pyvae.backends.available("cpu"))
        pyvae.__main__.report()
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert "AVAILABLE " + str([b for b in backends.available("cpu") if b != "cpu"]) in done.stdout
    assert "extension pyvae._C: not installed" in done.stdout and "FAILED" not in done.stdout


def test_a_failed_triton_module_turns_off_triton_for_its_family_only(tmp_path):
    pytest.importorskip("triton")
    broken, *others = registry.NAMES[::-1]
    done = _run("triton_broken", f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        import importlib, pyvae, torch
        from pyvae import backends, registry
        print("BROKEN", backends.available("cpu", {broken!r}))
        for name in {others!r}:
            print("OTHER", name, backends.available("cpu", name))
            example = importlib.import_module(registry.family(name).cases).example
            print("RAN", name, tuple(example(torch.randn(4, 8), torch.randn(4, 8), backend="triton").shape))
        print("ALL", backends.available("cpu"))
        try:
            backends.resolve("triton", torch.device("cpu"), {broken!r})
        except ValueError as exc:
            print("RESOLVE", exc)
        import pyvae.__main__
        pyvae.__main__.report()
    """, tmp_path, PYVAE_TEST_BROKEN_TRITON=broken)
    assert done.returncode == 0, done.stderr
    assert f"simulated: this Triton cannot compile {broken}" in done.stderr and f"off for {broken}" in done.stderr
    assert "'triton'" not in done.stdout.split("BROKEN", 1)[1].splitlines()[0]
    for name in others:
        assert f"OTHER {name} {backends.available('cpu', name)}" in done.stdout
        assert f"RAN {name} ()" in done.stdout
    assert "'triton'" in next(line for line in done.stdout.splitlines() if line.startswith("ALL"))
    assert "simulated" in next(line for line in done.stdout.splitlines() if line.startswith("RESOLVE"))
    assert f"{broken}: backend 'triton' is off" in done.stdout


def _source_checkout(tmp_path, with_build):
    """A copy of the checkout's pyvae/, kernels/ and setup.py (kernels/ becomes pyvae.kernels through
    pyvae/__init__.py alone), with or without an extension built in place, and code that hides every
    installed pyvae."""
    checkout = tmp_path / "checkout"
    for folder in ("pyvae", "kernels"):
        shutil.copytree(os.path.join(REPO, folder), checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd"))
    shutil.copy(os.path.join(REPO, "setup.py"), checkout)
    if with_build:
        built = backends.native_extension()
        if built is None:
            pytest.skip("needs a built extension to copy")
        shutil.copy(built.__file__, checkout / "pyvae")
    return textwrap.dedent("""
        import sys, torch
        # an editable install's finder would map pyvae.kernels to the real checkout's kernels/; the
        # copy (first on sys.path, the working directory) hides an installed pyvae
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        import pyvae, pyvae.__main__
        assert pyvae.__file__.startswith(sys.argv[1]), pyvae.__file__
        print("KERNELS", pyvae.kernels.__file__, pyvae.SOURCE_CHECKOUT)
        print("AVAILABLE", pyvae.backends.available("cpu"))
        for name in pyvae.registry.NAMES:
            print("FAMILY", name, pyvae.backends.available("cpu", name),
                  pyvae.backends.resolve("auto", torch.device("cpu"), name))
            try:
                pyvae.backends.resolve("cpu", torch.device("cpu"), name)
            except ValueError as exc:
                print("RESOLVE", exc)
        pyvae.__main__.report()
    """)


@pytest.mark.parametrize("with_build", [False, True], ids=["no_build", "built_in_place"])
def test_a_source_checkout_imports_and_names_what_is_missing(tmp_path, with_build):
    # A checkout, installed or not, is a whole pyvae: its kernels/ serve as pyvae.kernels (every
    # family's triton backend, and the fake kernels, which are the contracts in pyvae.kernels), and the
    # extension serves wherever it was built in place. Without a build: the torch backend, quietly,
    # and every message about the cpu backend names the missing build and the command that makes it.
    pytest.importorskip("triton")
    code = _source_checkout(tmp_path, with_build)
    checkout = os.path.realpath(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYVAE_REQUIRE_NATIVE", "PYVAE_BACKEND")}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-W", "always", "-c", code, os.path.join(checkout, "pyvae")],
                          capture_output=True, text=True, cwd=checkout, env=env, timeout=120)
    assert done.returncode == 0, done.stderr  # never an exception half-way through an op module
    assert "RuntimeWarning" not in done.stderr, done.stderr  # no backend turned off
    assert f"KERNELS {os.path.join(checkout, 'kernels', '__init__.py')} {checkout}" in done.stdout, done.stdout
    native = ["cpu"] if with_build else []
    assert f"AVAILABLE {native + ['triton', 'torch']}" in done.stdout, done.stdout
    for name in registry.NAMES:
        assert f"FAMILY {name} {native + ['triton', 'torch']} {'cpu' if with_build else 'torch'}" in done.stdout
    if with_build:
        assert "RESOLVE" not in done.stdout and "CPU kernels yes" in done.stdout
    else:
        missing = f"this source checkout ({checkout}) has no built extension pyvae._C"
        resolve_line = next(line for line in done.stdout.splitlines() if line.startswith("RESOLVE"))
        assert missing in resolve_line and "pip install --no-build-isolation -e ." in resolve_line, resolve_line
        assert f"extension pyvae._C: not installed ({missing}" in done.stdout, done.stdout


# ------------------------------------------------------------------------------ the ops' input checks
def _bad_calls():
    """Every family's BAD_CALLS (families/<name>.py), as test parameters."""
    for family in registry.FAMILIES:
        for i, (op, make_args, exc_type, words) in enumerate(importlib.import_module(family.cases).BAD_CALLS):
            yield pytest.param(family, op, make_args, exc_type, words, id=f"{op}-{i}")


def _on(device: str, args: tuple) -> tuple:
    """The call's arguments with its tensors on ``device``, but those it keeps on the CPU."""
    return tuple(a.tensor if isinstance(a, OnCPU) else a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("family,op,make_args,exc_type,words", list(_bad_calls()))
def test_every_backend_refuses_a_bad_call_in_the_cpp_ops_words(family, op, make_args, exc_type, words):
    """Each op's C++ binding, its Triton twin, its fake kernel (what torch.compile traces) and its
    torch backend refuse the call with one exception, word for word. (The torch backend serves
    float64 too: not for calls with float64 tensors, nor where the message lists the dtypes.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and any(isinstance(a, OnCPU) for a in make_args()):
        pytest.skip("a call across two devices needs a GPU")
    callers = {}
    native = "cpu" if device == "cpu" else "cuda"
    if native in backends.available(device, family.name):
        callers["C++"] = lambda: getattr(torch.ops.pyvae, op)(*_on(device, make_args()))

        def fake():
            with FakeTensorMode() as mode:
                args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _on(device, make_args()))
                getattr(torch.ops.pyvae, op)(*args)
        callers["fake"] = fake
    if "triton" in backends.available(device, family.name):
        callers["triton"] = lambda: getattr(torch.ops.pyvae, registry.triton_twin(op))(*_on(device, make_args()))
    if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in make_args()) and \
            "float32, float16 or bfloat16" not in words:
        callers["torch"] = lambda: family.op(op, "torch")(*_on(device, make_args()))
    messages = {}
    for name, call in callers.items():
        with pytest.raises(exc_type) as error:
            call()
        assert words in str(error.value), name
        messages[name] = str(error.value)
    assert len(set(messages.values())) == 1, messages


# ------------------------------------------------------------------------------ constants shared with C++
def test_the_python_copy_of_the_shared_constants_is_the_extensions():
    """pyvae._constants.FALLBACK (what a build without the extension uses) must equal what the C++
    kernels were compiled with."""
    from pyvae import _constants

    extension = backends.native_extension()
    if extension is None:
        pytest.skip("no extension to compare with")
    assert extension.shared_constants() == _constants.FALLBACK
    assert _constants.SHARED == _constants.FALLBACK


def test_first_compiled_call_in_a_process_does_not_recompile(tmp_path):
    """Backend resolution read a cache filled by the first call, which torch.compile guarded on: the
    first compiled call of a fresh process compiled twice. (A fresh process: in this one, earlier
    tests have filled the cache.) One call of every family's API in one compiled function."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        import importlib, torch, torch._dynamo.testing, pyvae
        examples = [importlib.import_module(f.cases).example for f in pyvae.registry.FAMILIES]
        counter = torch._dynamo.testing.CompileCounter()
        f = torch.compile(lambda a, b: sum(example(a, b) for example in examples), fullgraph=True, backend=counter)
        for _ in range(3):
            f(torch.randn(4, 8), torch.randn(4, 8))
        print("frames", counter.frame_count)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "frames 1" in done.stdout, done.stdout
