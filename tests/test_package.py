"""Backend selection, the package's report (python -m pyvae) and the layers."""
import os
import re
import subprocess
import sys

import pytest
import torch

import pyvae
from pyvae import backends
from pyvae.ops.reparam_kl import reference_eps

from tolerances import VALUE, assert_close_scaled, noise_scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_cpu_lists_torch_last():
    found = backends.available("cpu")
    assert found[-1] == "torch"
    if backends.native_extension() is not None:
        assert found[0] == "cpu"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_TRITON_INTERPRETED", False)
    monkeypatch.setattr(backends, "_AVAILABLE", {})
    assert "triton" not in backends.available("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"), "reparam_kl")


def test_auto_and_env_override(monkeypatch):
    monkeypatch.delenv("PYVAE_BACKEND", raising=False)
    expected = "cpu" if backends.native_extension() is not None else "torch"
    assert backends.resolve("auto", torch.device("cpu"), "reparam_kl") == expected
    monkeypatch.setenv("PYVAE_BACKEND", "torch")
    assert backends.resolve("auto", torch.device("cpu"), "reparam_kl") == "torch"
    # an explicit argument wins over the environment
    if backends.native_extension() is not None:
        assert backends.resolve("cpu", torch.device("cpu"), "reparam_kl") == "cpu"
    monkeypatch.setenv("PYVAE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PYVAE_BACKEND"):
        pyvae.reparameterize_kl(torch.randn(2, 3), torch.randn(2, 3))


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(ValueError, match="cannot serve tensors on device 'cpu'"):
        backends.resolve("cuda", torch.device("cpu"), "reparam_kl")


def test_extension_is_built():
    ext = backends.native_extension()
    assert ext is not None, "pyvae._C failed to import"
    assert ext.version == pyvae.__version__
    assert ext.has_cuda == (torch.version.cuda is not None)


def test_python_m_pyvae_reports_build_and_backends(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyvae"], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "1"}).stdout
    assert f"pyvae {pyvae.__version__}" in out
    assert "CPU kernels yes" in out
    assert "cpu (" in out and "reparam_kl -> cpu" in out and "vq -> cpu" in out
    assert "'triton'" in out  # the interpreter serves CPU tensors


def test_cpu_output_buffers_are_reused_not_shared():
    if backends.native_extension() is None:
        pytest.skip("needs the extension")
    logits, target = torch.randn(64, 8192, requires_grad=True), torch.rand(64, 8192)  # 2 MiB gradient
    backends.empty_cpu_cache()
    assert backends.cpu_cache_bytes() == 0
    pyvae.bernoulli_nll(logits, target, backend="cpu").backward()
    first = logits.grad.clone()
    first_ptr = logits.grad.data_ptr()
    held = logits.grad
    logits.grad = None
    pyvae.bernoulli_nll(logits, target, backend="cpu").backward()
    assert logits.grad.data_ptr() != first_ptr  # the first gradient is alive: never handed out twice
    torch.testing.assert_close(logits.grad, first, rtol=0, atol=0)
    del held
    logits.grad = None
    assert backends.cpu_cache_bytes() >= 2 * logits.numel() * 4  # both freed gradients are kept
    pyvae.bernoulli_nll(logits, target, backend="cpu").backward()
    torch.testing.assert_close(logits.grad, first, rtol=0, atol=0)  # a reused block is fully rewritten
    logits.grad = None
    backends.empty_cpu_cache()
    assert backends.cpu_cache_bytes() == 0


def test_cpu_cache_limit_from_environment(tmp_path):
    code = ("import torch, pyvae; x = torch.randn(64, 8192, requires_grad=True); "
            "pyvae.bernoulli_nll(x, torch.rand(64, 8192), backend='cpu').backward(); x.grad = None; "
            "print(pyvae.backends.cpu_cache_bytes())")
    held = {}
    for limit in ("0", "1024"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                             env={**os.environ, "PYVAE_CPU_CACHE_MB": limit}).stdout
        held[limit] = int(out.split()[-1])
    assert held["0"] == 0 and held["1024"] == 64 * 8192 * 4


def test_cpu_cache_gives_back_the_oldest_blocks_over_its_limit(tmp_path):
    # 3 MiB limit: 2 MiB blocks of two shapes alternate; only the most recent one stays cached.
    code = ("import torch, pyvae\n"
            "held = []\n"
            "for cols in (8192, 8200, 8192):\n"
            "    x = torch.randn(64, cols, requires_grad=True)\n"
            "    pyvae.bernoulli_nll(x, torch.rand(64, cols), backend='cpu').backward()\n"
            "    x.grad = None\n"
            "    held.append(pyvae.backends.cpu_cache_bytes())\n"
            "print(*held)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYVAE_CPU_CACHE_MB": "3"}).stdout
    assert [int(v) for v in out.split()] == [64 * 8192 * 4, 64 * 8200 * 4, 64 * 8192 * 4]


def test_tests_and_child_processes_import_this_checkout(tmp_path):
    # The suite runs against the checkout (conftest.py), its kernels/ bound as pyvae.kernels
    # (pyvae/__init__.py), and a child process started elsewhere (the CLI, bench/, the DDP workers)
    # imports the same files through the editable install.
    import pyvae.kernels._layout

    def in_repo(*parts):
        return os.path.realpath(os.path.join(REPO, *parts))

    assert os.path.realpath(pyvae.__file__) == in_repo("pyvae", "__init__.py")
    assert str(pyvae.SOURCE_CHECKOUT) == in_repo()
    assert os.path.realpath(pyvae.kernels.__file__) == in_repo("kernels", "__init__.py")
    assert os.path.realpath(pyvae.kernels._layout.__file__) == in_repo("kernels", "_layout.py")
    assert backends.native_extension() is not None, "pyvae._C is not built into the checkout's pyvae/"
    code = ("import os, pyvae, pyvae.kernels; "
            "print(os.path.realpath(pyvae.__file__), os.path.realpath(pyvae.kernels.__file__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.split() == [os.path.realpath(pyvae.__file__), os.path.realpath(pyvae.kernels.__file__)], (
        "this environment's pyvae is not an editable install of this checkout: "
        "`pip install --no-build-isolation -e .` (or ./run.sh test)")


def test_no_top_level_kernels_module(tmp_path):
    # pyvae.kernels comes from the repository's kernels/ without a top-level `kernels` module (the
    # name of another PyPI package): the editable install and pyvae/__init__.py bind only
    # pyvae.kernels. (Run from the repository root, Python's own sys.path[0] makes kernels/ importable.)
    code = ("import importlib.util, os, pyvae.kernels; spec = importlib.util.find_spec('kernels'); "
            "print(os.path.realpath(spec.origin) if spec and spec.origin else None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    found = out.strip()
    assert found == "None" or not found.startswith(os.path.realpath(REPO) + os.sep), found


def test_gaussian_latent_layer():
    torch.manual_seed(0)
    layer = pyvae.nn.GaussianLatent(16, 4)
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias"}
    h = torch.randn(8, 16)
    out = layer(h, seed=3)
    mu, logvar = layer.proj(h).chunk(2, dim=-1)
    z_ref, kl_ref = pyvae.reparameterize_kl(mu, logvar, seed=3, backend="torch")
    assert_close_scaled(out.z, z_ref, torch.float32, VALUE, noise_scale(mu, logvar, reference_eps(3, mu.shape)[0]), "z")
    torch.testing.assert_close(out.kl, kl_ref, atol=1e-5, rtol=1e-5)
    (out.z.sum() + out.kl.sum()).backward()
    assert layer.proj.weight.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(layer(h).z, layer.proj(h).chunk(2, -1)[0])


def test_vae_of_pyvae_layers_compiles_fullgraph_and_matches_eager():
    # Latent, VQ (EMA, updating its buffers in forward) and likelihood layers in one model, under
    # torch.compile(fullgraph=True): the same loss, gradients and codebook update as eager.
    import copy

    if backends.native_extension() is None:
        pytest.skip("needs the extension")

    class TinyVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(12, 8)
            self.latent = pyvae.nn.GaussianLatent(8, 4)
            self.vq = pyvae.nn.VectorQuantizer(6, 4, ema_decay=0.9)
            self.dec = torch.nn.Linear(4, 12)
            self.lik = pyvae.nn.GaussianLikelihood("learned", (12,))

        def forward(self, x):
            out = self.latent(self.enc(x))
            q = self.vq(out.z)
            return self.lik(self.dec(q.quantized), x) + out.kl.mean() + q.loss

    torch.manual_seed(0)
    eager_model = TinyVAE()
    compiled_model = copy.deepcopy(eager_model)
    x = torch.randn(16, 12)
    losses = []
    for model in (eager_model, torch.compile(compiled_model, fullgraph=True)):
        torch.manual_seed(1)  # the same noise seed for both
        loss = model(x)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), (_, p2) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(eager_model.vq.codebook, compiled_model.vq.codebook, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_triton_kernels_compile_for_nvidia_gpus():
    # The CPU suite runs the Triton kernels in Triton's interpreter, which accepts code a GPU compile
    # rejects: here every variant the launchers ask for is compiled for sm_90 (the search for sm_80
    # too) without a GPU, in a process of its own (the interpreter is on in this one).
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_gpu_compile.py")
    done = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    # and it compiled something of every kernel a launcher starts (none is left out of the check)
    import pyvae.kernels
    folder = os.path.dirname(pyvae.kernels.__file__)
    launched = {name for file in os.listdir(folder) if file.endswith(".py")
                for name in re.findall(r"wrap_triton\((\w+)\)", open(os.path.join(folder, file)).read())}
    compiled = {name for name in launched if re.search(rf"^ok\b.*\b{name}\b", done.stdout, re.MULTILINE)}
    assert len(launched) >= 6 and compiled == launched, (sorted(launched - compiled), done.stdout[-3000:])
