"""No silent fallbacks: a broken extension, a source checkout with or without a build, a Triton
module that fails to import, and Triton ops called directly with bad inputs.

The import cases run in fresh processes; they fake the extension's state with an import hook
(so they work the same on an editable and a normal install) and import pyvae from wherever it is
installed, except the source-checkout case, which imports a copy of the source tree with every
installed pyvae hidden.
"""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pyvae
from pyvae import backends, registry
from pyvae._constants import LikelihoodFlag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prepended to each child's code: an import hook that makes `pyvae._C` load from a given file (a text
# file named like the extension: a real dlopen failure), or be absent (an install without it).
_HOOK = textwrap.dedent("""
    import importlib.abc, importlib.util, sys, warnings
    MODE, FAKE = sys.argv[1], sys.argv[2]
    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pyvae._C" and MODE == "broken":
                return importlib.util.spec_from_file_location(name, FAKE)
            if name == "pyvae._C" and MODE == "absent":
                raise ModuleNotFoundError("No module named 'pyvae._C'", name=name)
            if name == "pyvae.kernels.vq" and MODE == "triton_vq_broken":
                raise RuntimeError("simulated: this Triton cannot compile vq")
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
    done = _run("broken", """
        import pyvae, torch
        print("AVAILABLE", pyvae.backends.available("cpu", "vq"))
        print("AUTO", pyvae.backends.resolve("auto", torch.device("cpu"), "vq"))
        try:
            pyvae.backends.resolve("cpu", torch.device("cpu"), "vq")
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
    assert "AVAILABLE " + str([b for b in backends.available("cpu", "vq") if b != "cpu"]) in done.stdout
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
    done = _run("triton_vq_broken", """
        import pyvae, torch
        from pyvae import backends
        print("VQ", backends.available("cpu", "vq"))
        print("KL", backends.available("cpu", "reparam_kl"), backends.available("cpu", "likelihood"))
        print("ALL", backends.available("cpu"))
        try:
            backends.resolve("triton", torch.device("cpu"), "vq")
        except ValueError as exc:
            print("RESOLVE", exc)
        z, kl = pyvae.reparameterize_kl(torch.randn(3, 5), torch.randn(3, 5), seed=1, backend="triton")
        print("RAN", tuple(z.shape))
        import pyvae.__main__
        pyvae.__main__.report()
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "simulated: this Triton cannot compile vq" in done.stderr and "off for vq" in done.stderr
    assert "'triton'" not in done.stdout.split("VQ", 1)[1].splitlines()[0]
    assert "KL " + str(backends.available("cpu", "reparam_kl")) + " " + str(backends.available("cpu", "likelihood")) \
        in done.stdout
    assert "'triton'" in next(line for line in done.stdout.splitlines() if line.startswith("ALL"))
    assert "simulated" in next(line for line in done.stdout.splitlines() if line.startswith("RESOLVE"))
    assert "RAN (3, 5)" in done.stdout
    assert "vq: backend 'triton' is off" in done.stdout


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
        print("AVAILABLE", pyvae.backends.available("cpu"), pyvae.backends.available("cpu", "likelihood"))
        print("OPS", pyvae.backends.available("cpu", "reparam_kl"), pyvae.backends.available("cpu", "vq"))
        print("AUTO", pyvae.backends.resolve("auto", torch.device("cpu"), "likelihood"))
        try:
            pyvae.backends.resolve("cpu", torch.device("cpu"), "vq")
        except ValueError as exc:
            print("RESOLVE", exc)
        pyvae.__main__.report()
    """)


@pytest.mark.parametrize("with_build", [False, True], ids=["no_build", "built_in_place"])
def test_a_source_checkout_imports_and_names_what_is_missing(tmp_path, with_build):
    # A checkout, installed or not, is a whole pyvae: its kernels/ serve as pyvae.kernels (every
    # family's triton backend, and the likelihood fake kernels that import pyvae.kernels), and the
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
    assert f"AVAILABLE {native + ['triton', 'torch']} {native + ['triton', 'torch']}" in done.stdout, done.stdout
    assert f"OPS {native + ['triton', 'torch']} {native + ['triton', 'torch']}" in done.stdout
    assert f"AUTO {'cpu' if with_build else 'torch'}" in done.stdout
    if with_build:
        assert "RESOLVE" not in done.stdout and "CPU kernels yes" in done.stdout
    else:
        missing = f"this source checkout ({checkout}) has no built extension pyvae._C"
        resolve_line = next(line for line in done.stdout.splitlines() if line.startswith("RESOLVE"))
        assert missing in resolve_line and "pip install --no-build-isolation -e ." in resolve_line, resolve_line
        assert f"extension pyvae._C: not installed ({missing}" in done.stdout, done.stdout


# ------------------------------------------------------------------------------ Triton op input checks
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_SEED = torch.tensor(3, dtype=torch.int64)
_GRAD_PRED = LikelihoodFlag.GRAD_PRED

# (op name, arguments, exception type, words of the message): bad inputs every backend refuses
BAD_CALLS = [
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 4), 1, 1, False), ValueError, "same shape"),
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 3, dtype=torch.float16), 1, 1, False), TypeError, "same dtype"),
    ("reparam_kl_forward", lambda: (_t(2, 3, dtype=torch.float64), _t(2, 3, dtype=torch.float64), 1, 1, False),
     TypeError, "float32, float16 or bfloat16, got Double"),
    ("reparam_kl_forward", lambda: (_t(()), _t(()), 1, 1, False), ValueError, "at least one dimension"),
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 3), -1, 1, False), ValueError, "seed must be in"),
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 3), 1, 0, False), ValueError, "n_samples must be >= 1"),
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 3), 1, 1, False, _t(3, 3)), ValueError, "does not broadcast"),
    ("reparam_kl_forward", lambda: (_t(2, 3), _t(2, 3), 1, 1, False, None, _t(3, dtype=torch.float16)),
     TypeError, "prior_logvar must have the dtype of mu"),
    # a grad_z or grad_kl of the wrong shape would be read past its end
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, _t(2, 3, 3), None), ValueError, "grad_z must have shape"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, _t(1, 4, 2), None), ValueError, "grad_z must have shape"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, _t(1, 4, 3, dtype=torch.float16), None),
     TypeError, "grad_z must have the dtype"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, None, _t(3, 4)), ValueError, "grad_kl must have the shape"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, None, _t(4, 3, dtype=torch.float16)),
     TypeError, "grad_kl must be float32"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED.int(), None, _t(4, 3)), ValueError, "one-element int64"),
    ("reparam_kl_backward", lambda: (_t(4, 3), _t(4, 3), _SEED, None, _t(4, 3), None, None, True, False),
     ValueError, "prior_mu_grad needs a prior_mu"),
    ("likelihood_forward", lambda: ("bernoulli", _t(4, 6), _t(4, 5), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "same shape"),
    ("likelihood_forward", lambda: ("bernoulli", _t(4, 6), _t(6, 4), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "same shape"),
    ("likelihood_forward", lambda: ("poisson", _t(4, 6), _t(4, 6), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "loss must be"),
    ("likelihood_forward", lambda: ("gaussian", _t(4, 6, dtype=torch.float64), _t(4, 6), None, 0.0, 0.0, _GRAD_PRED,
                                    1.0), TypeError, "prediction must be float32"),
    ("likelihood_forward", lambda: ("gaussian", _t(4, 6), _t(4, 6), _t(3, 6), 0.0, 0.0,
                                    _GRAD_PRED | LikelihoodFlag.GRAD_LOGVAR, 1.0),
     ValueError, "logvar of shape [3, 6] does not broadcast"),
    ("likelihood_forward", lambda: ("gaussian", _t(()), _t(()), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "batch dimension"),
    ("likelihood_forward", lambda: ("gaussian", _t(4, 6), _t(4, 6), None, 0.0, 0.0, LikelihoodFlag.GRAD_LOGVAR, 1.0),
     ValueError, "logvar is None"),
    ("likelihood_forward", lambda: ("gaussian", _t(4, 6), _t(4, 6), None, 0.0, 0.0, LikelihoodFlag.ALL + 1, 1.0),
     ValueError, "flags must be a combination"),
    ("scale_grad_", lambda: (_t(4, 6).t(), torch.tensor(2.0)), ValueError, "grad must be contiguous"),
    ("scale_grad_", lambda: (_t(4, 6), torch.tensor([2.0, 3.0])), ValueError, "single float32 value"),
    ("scale_grad_", lambda: (_t(4, 6, dtype=torch.float64), torch.tensor(2.0)), TypeError, "grad must be float32"),
    ("nearest_code", lambda: (_t(5, 3), _t(4, 4), True), ValueError, "x must be [..., D] with D = 4"),
    ("nearest_code", lambda: (_t(5, 3), _t(4, 3, 1), True), ValueError, "codebook must be 2-D"),
    ("nearest_code", lambda: (_t(5, 3), _t(0, 3), True), ValueError, "at least one code"),
    ("nearest_code", lambda: (_t(5, 3), _t(4, 3, dtype=torch.float64), True), TypeError, "codebook must be float32"),
    ("codebook_stats", lambda: (_t(5, 3), torch.zeros(6, dtype=torch.int64), 4), ValueError, "x's shape without"),
    ("codebook_stats", lambda: (_t(5, 3), torch.zeros(5, dtype=torch.int32), 4), TypeError, "indices must be int64"),
    ("codebook_stats", lambda: (_t(5, 3), torch.zeros(5, dtype=torch.int64), 0), ValueError, "num_codes must be"),
]


@pytest.mark.parametrize("name,make_args,exc_type,words", BAD_CALLS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_triton_ops_check_inputs_as_the_cpp_ops_do(name, make_args, exc_type, words):
    device = next((d for d in ("cpu", "cuda") if "triton" in backends.available(d)), None)
    if device is None:
        pytest.skip("the triton backend serves no device here")
    native = "cpu" if device == "cpu" else "cuda"

    def args():
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in make_args())

    with pytest.raises(exc_type) as triton_error:
        getattr(torch.ops.pyvae, registry.triton_twin(name))(*args())
    assert words in str(triton_error.value)
    if native in backends.available(device):  # the same exception, word for word, as the C++ op's
        with pytest.raises(exc_type) as cpp_error:
            getattr(torch.ops.pyvae, name)(*args())
        assert str(triton_error.value) == str(cpp_error.value)


def test_triton_ops_refuse_inputs_on_two_devices():
    if not torch.cuda.is_available() or "triton" not in backends.available("cuda"):
        pytest.skip("needs the triton backend and a CUDA device")
    cpu, gpu = _t(4, 3), _t(4, 3).cuda()
    with pytest.raises(ValueError, match="same device"):
        torch.ops.pyvae.reparam_kl_forward_triton(gpu, cpu, 1, 1, False)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.pyvae.nearest_code_triton(gpu, cpu, True)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.pyvae.likelihood_forward_triton("bernoulli", gpu, cpu, None, 0.0, 0.0, _GRAD_PRED, 1.0)


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


def _cpu_backends_using_the_constants():
    found = [b for b in ("cpu", "triton") if b in backends.available("cpu", "likelihood")]
    if not found:
        pytest.skip("neither the cpu nor the triton backend serves CPU tensors here")
    return found


def _block_sensitive_row(block: int) -> torch.Tensor:
    """pred - target for a row of two column blocks, whose per-element values (0.5 (pred - target)^2
    of a unit-variance Gaussian) sum to 2^23 + 1 in blocks of ``block`` columns (each block's sum,
    then the blocks in order, all exact: 2^23, then 0.5 + 0.5), and to 2^23 in larger or smaller
    blocks added in order (2^23 + 0.5 rounds to even, twice). The halves are the first and last
    columns of the second block: in different chunks and lanes of every kernel's inner loop."""
    diff = torch.zeros(2 * block)
    diff[0] = 2.0 ** 12  # 0.5 * 2^24 = 2^23
    diff[block] = diff[2 * block - 1] = 1.0  # 0.5 each
    return diff


def test_likelihood_column_block_is_the_same_on_every_backend():
    """Per-sample sums add the column blocks' partial sums in order: a row crossing one block gives
    the same bits on the cpu and triton backends, those of blocks of LIKELIHOOD_COLUMN_BLOCK."""
    from pyvae._constants import LIKELIHOOD_COLUMN_BLOCK as block

    diff = _block_sensitive_row(block).expand(2, -1)
    target = torch.randn(2, 2 * block).round()  # integers: pred - target stays exact
    pred = target + diff
    expected = torch.tensor([2.0 ** 23 + 1.0] * 2)
    for backend in _cpu_backends_using_the_constants():
        out = pyvae.gaussian_nll(pred, target, full=False, reduction="per_sample", backend=backend)
        assert torch.equal(out, expected), backend


def test_triton_likelihood_kernel_reads_its_column_block(monkeypatch):
    """The Triton kernel takes the block as a constexpr: with a smaller one the same row sums as
    blocks of that size (a kernel with a block of its own would give 2^23)."""
    if "triton" not in backends.available("cpu", "likelihood"):
        pytest.skip("needs the triton backend on CPU tensors")
    from pyvae.kernels import likelihood as triton_likelihood

    block = 4096
    monkeypatch.setattr(triton_likelihood, "LIKELIHOOD_COLUMN_BLOCK", block)
    pred = _block_sensitive_row(block)[None]
    out = pyvae.gaussian_nll(pred, torch.zeros_like(pred), full=False, reduction="per_sample", backend="triton")
    assert out.item() == 2.0 ** 23 + 1.0


def test_logvar_group_rows_is_the_same_on_every_backend():
    """A batch-shared log-variance's gradient comes as sums over LOGVAR_GROUP_ROWS rows: the same
    shape from the C++ op, its Triton twin and the fake kernel, with each group's sum, for a batch
    that crosses a group boundary."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyvae._constants import LOGVAR_GROUP_ROWS as group

    rows = 2 * group + 3
    pred, target, logvar = torch.randn(rows, 5), torch.randn(rows, 5), 0.3 * torch.randn(1, 5)
    flags = LikelihoodFlag.GRAD_LOGVAR | LikelihoodFlag.GROUP_LOGVAR_GRAD
    # d/dlogvar of 0.5 ((t - p)^2 e^-v + v), per element, summed over each group of rows
    per_element = 0.5 * (1 - (target.double() - pred.double()) ** 2 * torch.exp(-logvar.double()))
    expected = torch.stack([group_rows.sum(0) for group_rows in per_element.split(group)])
    for backend in _cpu_backends_using_the_constants():
        op = getattr(torch.ops.pyvae, "likelihood_forward_triton" if backend == "triton" else "likelihood_forward")
        (grad_logvar,) = op("gaussian", pred, target, logvar, 0.0, 0.0, flags, 1.0)[1]
        assert grad_logvar.shape == (3, 5), backend
        torch.testing.assert_close(grad_logvar.double(), expected, rtol=1e-5, atol=1e-5, msg=backend)
    if backends.native_extension() is not None:
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in (pred, target, logvar)]
            (grad_logvar,) = torch.ops.pyvae.likelihood_forward("gaussian", *fake, 0.0, 0.0, flags, 1.0)[1]
        assert grad_logvar.shape == (3, 5)


def _chunk_sensitive_rows(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [2 chunk + 5, 1] and indices: code 0's rows sum to 2^23 + 1 in chunks of ``chunk`` rows
    added in order (2^23, then 0.5 + 0.5), to 2^23 in chunks of chunk / 2 (2^23 + 0.5 rounds to
    even, twice) and to 2^23 added row by row; code 1 takes the 5 rows between."""
    x = torch.zeros(2 * chunk + 5, 1)
    idx = torch.zeros(2 * chunk + 5, dtype=torch.int64)
    idx[3:8] = 1
    code0_rows = torch.nonzero(idx == 0).flatten()
    x[code0_rows[0]] = 2.0 ** 23
    x[code0_rows[chunk]] = x[code0_rows[2 * chunk - 1]] = 0.5
    x[3:8] = torch.arange(5.0)[:, None]
    return x, idx


def test_stats_chunk_rows_is_the_same_on_both_gpu_backends():
    """The GPU codebook_stats sum each code's rows in chunks of STATS_CHUNK_ROWS and add the chunk
    sums in order; on these rows that gives 2^23 + 1 where another chunk size (or the cpu backend's
    row-by-row sum) gives 2^23. The CUDA backend's Python part (the preparation, then the C++ op
    codebook_chunk_sums) runs here with the Triton chunk kernels standing in for the C++ ones."""
    if "triton" not in backends.available("cpu", "vq"):
        pytest.skip("needs the triton backend on CPU tensors")
    from pyvae._constants import STATS_CHUNK_ROWS
    from pyvae.kernels import vq as triton_vq
    from pyvae.ops.vq import _codebook_stats_cuda

    x, idx = _chunk_sensitive_rows(STATS_CHUNK_ROWS)
    expected_counts = torch.tensor([2 * STATS_CHUNK_ROWS, 5.0, 0.0])
    expected_sums = torch.tensor([[2.0 ** 23 + 1.0], [10.0], [0.0]])
    results = {"triton": torch.ops.pyvae.codebook_stats_triton(x, idx, 3)}
    if backends.native_extension() is not None:
        with torch.library._scoped_library("pyvae", "IMPL") as lib:
            lib.impl("codebook_chunk_sums", lambda x2, *plan: triton_vq._chunk_sums(x2, triton_vq.StatsPlan(*plan)),
                     "CPU")
            results["cuda (its Python part)"] = _codebook_stats_cuda(x, idx, 3)
    for name, (counts, sums) in results.items():
        assert torch.equal(counts, expected_counts), name
        assert torch.equal(sums, expected_sums), name


def test_first_compiled_call_in_a_process_does_not_recompile(tmp_path):
    """Backend resolution read a cache filled by the first call, which torch.compile guarded on: the
    first compiled call of a fresh process compiled twice. (A fresh process: in this one, earlier
    tests have filled the cache.)"""
    script = textwrap.dedent("""
        import torch, torch._dynamo.testing, pyvae
        counter = torch._dynamo.testing.CompileCounter()
        f = torch.compile(lambda m, l: pyvae.reparameterize_kl(m, l, seed=1)[1].sum()
                          + pyvae.bernoulli_nll(m, l.sigmoid()) + pyvae.vector_quantize(m, l).loss,
                          fullgraph=True, backend=counter)
        for _ in range(3):
            f(torch.randn(4, 8), torch.randn(4, 8))
        print("frames", counter.frame_count)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "frames 1" in done.stdout, done.stdout
