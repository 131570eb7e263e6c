"""The training CLI (`pyvae train`, pyvae.train, pyvae.data): end-to-end runs of every model,
metrics.json against independent references, --resume, the atomic checkpoint, bad input, and a
two-process torchrun run."""
import ctypes
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyvae
from pyvae import data as pdata
from pyvae import train as ptrain
from pyvae.__main__ import main
from pyvae.train.options import DEFAULTS


# Small models and one epoch: the point is the plumbing, not the fit.
TINY = {
    "vae": ["--hidden-dims", "32", "--latent-dim", "4"],
    "convvae": ["--channels", "4,8", "--hidden-dim", "16", "--latent-dim", "4"],
    "cvae": ["--hidden-dims", "32", "--latent-dim", "4"],
    "vqvae": ["--channels", "8,8", "--num-codes", "16", "--code-dim", "4"],
    "hvae": ["--hidden-dims", "32", "--latent-dims", "3,2"],
}


def cli(capsys, *argv):
    """Runs `pyvae ...` in this process: (exit status, stdout, stderr). Training runs use one
    thread: the models are tiny, and on a busy machine multi-threaded small ops are many times slower."""
    argv = [str(a) for a in argv] + (["--threads", "1"] if argv[:1] == ("train",) else [])
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_run(capsys, model, out, *extra):
    rc, stdout, err = cli(capsys, "train", "--model", model, *TINY[model], "--epochs", "1", "--batch-size", "128",
                          "--iwae-k", "8", "--quiet", "--out", out, *extra)
    assert rc == 0, err
    return json.loads((out / "metrics.json").read_text())


def digits_split():
    """The digits split, computed here from scikit-learn and the documented seed and fraction."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.reshape(len(d.images), -1) / 16.0
    order = np.random.default_rng(pdata.SPLIT_SEED).permutation(len(x))
    n_test = round(len(x) * pdata.TEST_FRACTION)
    return x[order[n_test:]], x[order[:n_test]], d.target[order[n_test:]], d.target[order[:n_test]]


def load_model(run_dir, weights="evaluated"):
    """The trained model, rebuilt from the checkpoint and the options in metrics.json, with the
    weights it was evaluated with (the weight average, where the run kept one) or its ``"last"``."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    args = ptrain.parse_args(["--model", ckpt["args"]["model"]])
    for k, v in ckpt["args"].items():
        setattr(args, k, tuple(v) if isinstance(v, list) else v)
    model = ptrain.build_model(args, pdata.load_dataset(args.dataset, binarize=args.binarize))
    model.load_state_dict(ckpt["model"])
    if weights == "evaluated" and ckpt["average"] is not None:
        with torch.no_grad():
            for p, averaged in zip(model.parameters(), ckpt["average"]["params"]):
                p.copy_(averaged)
    return model.eval(), ckpt


def check_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} is (nearly) blank"


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("model", ["vae", "convvae", "cvae", "vqvae", "hvae"])
def test_every_model_trains_and_reports(capsys, tmp_path, model):
    m = tiny_run(capsys, model, tmp_path)
    _, x_test, _, y_test = digits_split()
    assert m["model"] == model and m["n_test"] == len(x_test) and m["n_train"] == 1797 - len(x_test)
    assert m["epochs"] == 1 and m["steps"] == math.ceil(m["n_train"] / 128)
    assert m["steps_per_second"] > 0 and m["wall_seconds"] >= m["train_seconds"] > 0
    assert m["device"] == "cpu" and m["world_size"] == 1 and m["torch_version"] == torch.__version__
    assert m["backends"] == {op: pyvae.backends.resolve("auto", torch.device("cpu"), op)
                             for op in pyvae.registry.NAMES}
    assert m["relative_improvement"] == pytest.approx((m["baseline"]["test_nll"] - m["test_negative_elbo"])
                                                      / abs(m["baseline"]["test_nll"]))
    # the reported test negative ELBO is the trained model's, recomputed here from the checkpoint
    net, ckpt = load_model(tmp_path)
    assert ckpt["epoch"] == 1 and ckpt["step"] == m["steps"] and len(ckpt["history"]["step_loss"]) == m["steps"]
    x = torch.tensor(x_test, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y_test) if model == "cvae" else None
    assert m["test_negative_elbo"] == pytest.approx(net.negative_elbo(x, y).double().mean().item(), rel=1e-5)
    if model == "vqvae":
        assert m["test_recon_nll"] == pytest.approx(net(x).recon_loss.double().mean().item(), rel=1e-5)
        assert ckpt["history"]["epochs"][-1]["test_recon_nll"] == pytest.approx(m["test_recon_nll"], rel=1e-6)
        counts = np.bincount(net.encode_indices(x).flatten().numpy(), minlength=16)
        assert m["code_counts"] == counts.tolist()
        assert m["codes_used"] == (counts > 0).sum() and m["code_usage"] == pytest.approx((counts > 0).mean())
        p = counts / counts.sum()
        assert m["perplexity"] == pytest.approx(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-5)
        pictures = ["samples.png", "reconstructions.png", "loss_curves.png", "code_usage.png"]
    else:
        assert m["test_negative_elbo"] == pytest.approx(m["test_recon_nll"] + m["test_kl"])
        assert 0 < m["test_kl"] and math.isfinite(m["iwae_nll_k8"])
        latent = 5 if model == "hvae" else 4
        assert 0 <= m["active_units"] <= latent and m["latent_dim"] == len(m["latent_variances"]) == latent
        if model == "hvae":  # per-layer KLs of negative_elbo's own draw, and active units per layer
            recon, kl_layers = net.elbo_terms(x)
            assert m["test_kl_layers"] == pytest.approx(kl_layers.double().mean(1).tolist(), rel=1e-5)
            assert sum(m["test_kl_layers"]) == pytest.approx(m["test_kl"])
            assert m["test_recon_nll"] == pytest.approx(recon.double().mean().item(), rel=1e-5)
            variances = torch.tensor(m["latent_variances"])
            assert m["latent_dims"] == [3, 2] and m["active_units_layers"] == [
                int((variances[:3] > 0.01).sum()), int((variances[3:] > 0.01).sum())]
        pictures = ["samples.png", "reconstructions.png", "loss_curves.png", "latent_traversal.png"]
    assert m["pictures"] == pictures
    for name in pictures:
        check_png(tmp_path / name)


def test_baseline_matches_an_independent_fit():
    x_train, x_test, _, _ = digits_split()
    data = pdata.load_dataset("digits")
    nll, info = ptrain.baseline_nll(data, "bernoulli")
    p = (x_train.sum(0) + 0.5) / (len(x_train) + 1)
    ref = -(x_test * np.log(p) + (1 - x_test) * np.log1p(-p)).sum(1)
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-5)
    nll, _ = ptrain.baseline_nll(data, "gaussian")
    mean, var = x_train.mean(0), np.maximum(x_train.var(0), 1 / 255 ** 2 / 12)
    ref = (0.5 * np.log(2 * np.pi * var) + (x_test - mean) ** 2 / (2 * var)).sum(1)
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-4)
    # continuous Bernoulli: the fitted logits are the maximum-likelihood ones of the smoothed counts,
    # so the training NLL of slightly moved logits is higher
    nll, _ = ptrain.baseline_nll(data, "continuous_bernoulli")
    cb = torch.distributions.ContinuousBernoulli
    assert torch.isfinite(nll).all()
    assert nll.double().mean() < (-cb(probs=torch.tensor(p).clamp(1e-3, 1 - 1e-3)).log_prob(
        torch.tensor(x_test)).sum(1)).mean()


def test_hvae_options_reach_the_model():
    data = pdata.load_dataset("digits")
    args = ptrain.parse_args(["--model", "hvae", "--latent-dims", "6,4,2", "--free-bits", "0.1,0,0.2", "--beta", "0.5",
                              "--hidden-dims", "32,16", "--kl-warmup-steps", "7"])
    model = ptrain.build_model(args, data)
    assert isinstance(model, pyvae.models.HierarchicalVAE)
    assert (model.latent_dims, model.free_bits, model.beta, model.hidden_dims, model.kl_warmup_steps) == \
           ((6, 4, 2), (0.1, 0.0, 0.2), 0.5, (32, 16), 7)
    model = ptrain.build_model(ptrain.parse_args(["--model", "hvae", "--free-bits", "0.3"]), data)
    defaults = DEFAULTS["hvae"]
    assert model.free_bits == (0.3,) * 3 and model.latent_dims == defaults["latent_dims"] and \
        model.kl_warmup_steps == defaults["kl_warmup_steps"]
    assert model.likelihood == "dmol" and model.recon_likelihood.num_classes == 17  # the digits' levels


def test_a_short_vae_run_beats_the_baseline(capsys, tmp_path):
    rc, out, err = cli(capsys, "train", "--model", "vae", "--hidden-dims", "64", "--latent-dim", "4",
                       "--epochs", "6", "--batch-size", "32", "--lr", "3e-3", "--iwae-k", "20", "--out", tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(m["test_negative_elbo"]) and m["test_negative_elbo"] < m["baseline"]["test_nll"]
    assert m["relative_improvement"] > 0.02
    assert m["iwae_nll_k20"] < m["test_negative_elbo"] + 0.1  # a tighter bound (up to noise)
    assert m["active_units"] >= 1
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]["epochs"]
    assert history[-1]["test_negative_elbo"] == pytest.approx(m["test_negative_elbo"], rel=1e-6)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "epoch 6/6" in out and "test negative ELBO" in out  # per-epoch lines and the summary


def test_compile_trains_as_eager_does(capsys, tmp_path):
    base = ["train", "--model", "vae", *TINY["vae"], "--epochs", "1", "--batch-size", "256", "--iwae-k", "2", "--quiet"]
    assert cli(capsys, *base, "--out", tmp_path / "eager")[0] == 0
    assert cli(capsys, *base, "--out", tmp_path / "compiled", "--compile")[0] == 0
    eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    compiled = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    np.testing.assert_allclose(compiled["history"]["step_loss"], eager["history"]["step_loss"], rtol=1e-4)
    for k, v in eager["model"].items():
        torch.testing.assert_close(compiled["model"][k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "compiled" / "metrics.json").read_text())["compile"] is True


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("model", ["vae", "vqvae"])  # random noise; EMA codebook and dead-code restarts
def test_resume_continues_exactly(capsys, tmp_path, model):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["train", "--model", model, *TINY[model], "--batch-size", "256", "--iwae-k", "2", "--quiet"]
    assert cli(capsys, *base, "--epochs", "3", "--out", a)[0] == 0
    assert cli(capsys, *base, "--epochs", "2", "--out", b)[0] == 0
    first = torch.load(b / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 2
    assert cli(capsys, *base, "--epochs", "3", "--out", b, "--resume")[0] == 0
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert cb["epoch"] == 3 and cb["step"] == ca["step"] == 3 * math.ceil(1438 / 256)
    assert cb["history"]["step_loss"][:len(first["history"]["step_loss"])] == first["history"]["step_loss"]
    assert cb["history"]["step_loss"] == ca["history"]["step_loss"]
    assert [e["test_negative_elbo"] for e in cb["history"]["epochs"]] == \
           [e["test_negative_elbo"] for e in ca["history"]["epochs"]]
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert (ca["average"] is None) == (model == "vqvae")  # the vae's defaults keep a weight average
    if ca["average"] is not None:
        assert ca["average"]["updates"] == cb["average"]["updates"] == ca["step"]
        for u, v in zip(ca["average"]["params"], cb["average"]["params"]):
            assert torch.equal(u, v)
    assert json.loads((b / "metrics.json").read_text())["epochs"] == 3


# Options of the kill-and-resume test: a KL warm-up that is still ramping when the run is killed, and
# (vqvae) enough codes that some die after the kill, so dead-code restarts, whose rows the
# quantizer's step counter salts, happen in the resumed epochs (with 16 codes none do).
RESUME_TINY = {**{m: [*TINY[m], "--kl-warmup-steps", "12"] for m in ("vae", "convvae", "cvae")},
               "vqvae": ["--channels", "8,8", "--num-codes", "64", "--code-dim", "4"], "hvae": TINY["hvae"]}
# a residual quantizer: every stage's EMA step, restarts and usage resume exactly too
RESUME_TINY["vqvae-residual"] = [*RESUME_TINY["vqvae"], "--num-quantizers", "3"]
# What may differ between two runs of the same training: times and the command line.
RUN_SPECIFIC = ("train_seconds", "steps_per_second", "wall_seconds", "args")


@pytest.mark.parametrize("model", ["vae", "convvae", "cvae", "vqvae", "vqvae-residual", "hvae"])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(capsys, tmp_path, model):
    # 3 epochs of 6 steps (1438 training digits, batches of 256). The killed run stops itself
    # (SIGSTOP) after step 8, in epoch 2, after the checkpoint of epoch 1: a known point, no timing.
    argv = ["train", "--model", model.split("-")[0], *RESUME_TINY[model], "--epochs", "3", "--batch-size", "256", "--iwae-k", "4",
            "--quiet", "--threads", "1"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pyvae", *argv, "--out", str(killed), "--debug-stop-at-step", "8"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert cli(capsys, *argv, "--out", whole)[0] == 0  # the uninterrupted run, meanwhile
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), (status, (tmp_path / "killed.log").read_text())
        assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 6  # epoch 1's
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "metrics.json").exists()
    rc, _, err = cli(capsys, *argv, "--out", killed, "--resume")
    assert rc == 0, err
    resumed, expected = (json.loads((d / "metrics.json").read_text()) for d in (killed, whole))
    for key in RUN_SPECIFIC:
        resumed.pop(key), expected.pop(key)
    assert resumed == expected  # every figure (and vqvae's code counts) exactly
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (killed, whole))
    assert a["history"]["step_loss"] == b["history"]["step_loss"] and a["step"] == b["step"] == 18
    for part in ("model", "buffers"):
        assert a[part].keys() == b[part].keys()
        for k, v in b[part].items():
            assert torch.equal(a[part][k], v), (part, k)


def test_resume_refuses_other_options_and_fresh_runs_keep_checkpoints(capsys, tmp_path):
    base = ["train", "--model", "vae", *TINY["vae"], "--batch-size", "512", "--iwae-k", "2", "--quiet",
            "--out", tmp_path]
    assert cli(capsys, *base, "--epochs", "1")[0] == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    rc, _, err = cli(capsys, *base, "--epochs", "2", "--resume", "--lr", "0.01")
    assert rc == 2 and f"--lr {DEFAULTS['vae']['lr']} (now 0.01)" in err and err.count("\n") == 1
    rc, _, err = cli(capsys, *base, "--epochs", "2")
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    rc, _, err = cli(capsys, *base, "--epochs", "1", "--resume")  # already there: only the outputs again
    assert rc == 0 and (tmp_path / "checkpoint.pt").read_bytes() == before
    assert cli(capsys, *base, "--epochs", "1", "--overwrite", "--seed", "1")[0] == 0
    assert (tmp_path / "checkpoint.pt").read_bytes() != before


def test_a_crash_while_saving_leaves_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    base = ["train", "--model", "vae", *TINY["vae"], "--batch-size", "512", "--iwae-k", "2", "--quiet",
            "--out", tmp_path]
    assert cli(capsys, *base, "--epochs", "1")[0] == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(len(before) // 2)
        f.truncate()  # half a checkpoint written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):  # not a usage error: it propagates
        main([str(a) for a in base] + ["--epochs", "2", "--resume", "--threads", "1"])
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([  # no temporary file left
        "checkpoint.pt", "metrics.json", "samples.png", "reconstructions.png", "loss_curves.png",
        "latent_traversal.png"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------------------- bad input
def _write(path, **arrays):
    if path.suffix == ".npy":
        np.save(path, next(iter(arrays.values())))
    else:
        np.savez(path, **arrays)
    return path


def _bad_inputs(tmp_path):
    img = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    return [
        (["--model", "gan"], "argument --model: invalid choice: 'gan'"),
        (["--model", "vae", "--colour"], "unrecognized arguments: --colour"),
        (["--model", "vae", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--model", "vae", "--num-codes", "8"], "--num-codes does not apply to --model vae"),
        ([], "the following arguments are required: --model"),
        (["--model", "vae", "--dataset", tmp_path / "missing.npz"], "dataset file not found"),
        (["--model", "vae", "--dataset", _write(tmp_path / "flat.npy", x=img.reshape(20, 64))],
         "images must be [N, H, W], [N, C, H, W] or [N, H, W, C]; got an array of shape (20, 64)"),
        (["--model", "vae", "--dataset", _write(tmp_path / "int.npy", x=(img * 9).astype(np.int32))],
         "got dtype int32"),
        (["--model", "vae", "--dataset", _write(tmp_path / "range.npz", x=img * 2)],
         "floating-point images must lie in [0, 1]"),
        (["--model", "vae", "--dataset", _write(tmp_path / "nan.npz", x=np.where(img > 0.5, np.nan, img))],
         "NaN or infinite"),
        (["--model", "cvae", "--dataset", _write(tmp_path / "nolabels.npz", images=img)],
         "--model cvae needs class labels"),
        (["--model", "cvae", "--dataset", _write(tmp_path / "badlabels.npz", x=img, y=np.arange(19))],
         "labels must be a 1-D array with one label per image (20)"),
        (["--model", "cvae", "--dataset", _write(tmp_path / "floatlabels.npz", x=img, y=np.ones(20))],
         "labels must be integers"),
        (["--model", "vae", "--dataset", _corrupt(tmp_path / "corrupt.npz")], "cannot be read as .npz"),
        (["--model", "vae", "--dataset", tmp_path], "is a directory"),
        (["--model", "vae", "--dataset", _touch(tmp_path / "images.csv")], "unsupported file type '.csv'"),
        (["--model", "vae", "--resume"], "--resume: no checkpoint at"),
        (["--model", "vqvae", "--downsample", "5"], "downsample must be an int in [0, len(channels) = 2]"),
        (["--model", "vae", "--backend", "cuda"], "--backend cuda: backend 'cuda' cannot serve tensors on device"),
        (["--model", "hvae", "--latent-dims", "8"], "latent_dims must be a sequence of at least 2 positive ints"),
        (["--model", "hvae", "--latent-dims", "8,0"], "argument --latent-dims: expected comma-separated positive "
         "integers, got '8,0'"),
        (["--model", "hvae", "--latent-dims", "8,x"], "argument --latent-dims: expected comma-separated"),
        (["--model", "hvae", "--latent-dim", "8"], "--latent-dim does not apply to --model hvae"),
        (["--model", "vae", "--latent-dims", "8,4"], "--latent-dims does not apply to --model vae"),
        (["--model", "hvae", "--free-bits", "0.1,0.2"], "free_bits must be a number >= 0 (nats per latent "
         "dimension) or a sequence of 3, one per layer"),
        (["--model", "hvae", "--free-bits", "0.1,-1,0"], "argument --free-bits: expected a finite number >= 0, or a "
         "comma list"),
        (["--model", "vae", "--free-bits", "0.1,0.2"], "--free-bits takes one number for --model vae"),
        (["--model", "vae", "--out", _touch(tmp_path / "a_file") / "run"],
         f"--out {tmp_path / 'a_file' / 'run'}: cannot create the directory (Not a directory)"),
        # a test split of one image: the VAE family's active units (a variance over it) are undefined
        (["--model", "hvae", "--dataset", _write(tmp_path / "seven.npy", x=img[:7])],
         "its test split has 1 image, and the evaluation of --model hvae needs at least 2 (active units are a "
         "variance over the test images): give it at least 8 images"),
    ] + ([] if torch.cuda.is_available() else [(["--model", "vae", "--device", "cuda"], "CUDA is not available")])


def _touch(path):
    path.write_text("0,1\n")
    return path


def _corrupt(path):
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    return path


def test_bad_input_gets_one_line_and_exit_status_2(capsys, tmp_path):
    os.chdir(tmp_path)  # the default --out (runs/<model>) must not exist for the --resume case
    for argv, message in _bad_inputs(tmp_path):
        rc, out, err = cli(capsys, "train", *argv)
        assert rc == 2, (argv, err)
        assert err.startswith("pyvae train: error: ") and message in err and err.count("\n") == 1, (argv, err)
        assert out == ""
    assert not os.path.exists("runs")  # nothing was written


def test_a_checkpoint_that_cannot_be_resumed_gets_one_line_and_exit_status_2(capsys, tmp_path):
    base = ["train", "--model", "vae", *TINY["vae"], "--batch-size", "512", "--iwae-k", "2", "--quiet", "--out", tmp_path]
    assert cli(capsys, *base, "--epochs", "1")[0] == 0
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    path = tmp_path / "checkpoint.pt"
    for change, message in [
        (lambda c: c.pop("args"), f"--resume: {path} is incomplete or damaged (no args), so it cannot be resumed"),
        (lambda c: c.pop("buffers"), "is incomplete or damaged (no buffers)"),
        (lambda c: c.update(args=[1, 2]), "is incomplete or damaged (its args are not a dict)"),
        (lambda c: c.update(format=1), f"--resume: {path} has checkpoint format 1, and this pyvae resumes format 3 only"),
        (lambda c: c.pop("format"), f"--resume: {path} is not a pyvae train checkpoint"),
        (lambda c: c["model"].pop("decoder.1.bias"), f"--resume: {path} does not fit this model and its options "
         "(RuntimeError: Error(s) in loading state_dict for VAE: Missing key(s) in state_dict: \"decoder.1.bias\"."),
        (lambda c: c["buffers"].update(extra=torch.zeros(1)), "(ValueError: its unsaved buffers ['extra'] are not this "
         "model's [])"),
        (lambda c: c["history"].pop("epochs"), "(ValueError: its history lacks step_loss, epochs or train_seconds)"),
        (lambda c: c["optimizer"].update(param_groups=[]), "does not fit this model and its options (ValueError: "),
    ]:
        broken = {**good, "model": dict(good["model"]), "buffers": dict(good["buffers"]),
                  "history": dict(good["history"]), "optimizer": dict(good["optimizer"])}
        change(broken)
        torch.save(broken, path)
        rc, out, err = cli(capsys, *base, "--epochs", "2", "--resume")
        assert rc == 2 and err.startswith("pyvae train: error: ") and message in err and err.count("\n") == 1, err
        assert out == "" and torch.load(path, weights_only=True)["epoch"] == 1  # nothing trained or written


def _no_module(monkeypatch, *names):
    """Imports of ``names`` fail from now on (None in sys.modules), as on a machine without them."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_no_scikit_learn_gets_one_line_naming_the_fix(capsys, tmp_path, monkeypatch):
    _no_module(monkeypatch, "sklearn", "sklearn.datasets")
    rc, out, err = cli(capsys, "train", "--model", "vae", "--out", tmp_path / "run")
    assert rc == 2 and out == "" and err == (
        'pyvae train: error: --dataset digits needs scikit-learn, which is not installed: pip install "pyvae[train]" '
        "(or scikit-learn), or pass an .npz/.npy file\n")
    assert not (tmp_path / "run").exists()


def _assert_result_without_pictures(run_dir, err, why):
    """The run succeeded with one warning line naming why there are no pictures, and its metrics are complete."""
    assert err.count("\n") == 1 and err.startswith(f"pyvae train: warning: no pictures ({why}") and \
        err.endswith("metrics.json and checkpoint.pt are complete\n"), err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["pictures_skipped"] in err and math.isfinite(m["test_negative_elbo"]) and m["steps"] == 3
    return m


def test_without_matplotlib_a_run_keeps_its_result_and_warns_with_the_fix(capsys, tmp_path, monkeypatch):
    _no_module(monkeypatch, "matplotlib", "matplotlib.pyplot")
    rc, out, err = cli(capsys, "train", "--model", "vae", *TINY["vae"], "--epochs", "1", "--batch-size", "512",
                       "--iwae-k", "2", "--quiet", "--out", tmp_path)
    assert rc == 0
    m = _assert_result_without_pictures(tmp_path, err, 'matplotlib is not installed: pip install "pyvae[train]"')
    assert m["pictures"] == [] and not list(tmp_path.glob("*.png"))
    assert out.startswith(f"wrote {tmp_path}: metrics.json, checkpoint.pt\n")


def test_metrics_are_written_before_the_pictures_and_a_picture_error_only_warns(capsys, tmp_path, monkeypatch):
    import matplotlib.figure

    real_savefig, seen = matplotlib.figure.Figure.savefig, []

    def savefig(fig, path, *args, **kwargs):  # the first picture is saved, the second fails as a headless setup may
        seen.append(json.loads((tmp_path / "metrics.json").read_text()) if (tmp_path / "metrics.json").exists() else None)
        if len(seen) > 1:
            raise RuntimeError("Invalid DISPLAY variable")
        real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rc, _, err = cli(capsys, "train", "--model", "vqvae", *TINY["vqvae"], "--epochs", "1", "--batch-size", "512",
                     "--quiet", "--out", tmp_path)
    assert rc == 0
    m = _assert_result_without_pictures(tmp_path, err, "RuntimeError: Invalid DISPLAY variable; they need matplotlib")
    assert m["pictures"] == ["samples.png"] and sorted(p.name for p in tmp_path.glob("*.png")) == ["samples.png"]
    before = seen[0]  # metrics.json as it was when the first picture was drawn: every figure already there
    assert before is not None and before["pictures"] == []
    assert {k: v for k, v in before.items() if k not in ("pictures", "wall_seconds")} == \
           {k: v for k, v in m.items() if k not in ("pictures", "wall_seconds", "pictures_skipped")}


def test_a_test_split_of_one_image_trains_and_evaluates_where_it_can(capsys, tmp_path):
    img = np.random.default_rng(0).random((7, 8, 8)).astype(np.float32)  # 6 training images, 1 test image
    m = tiny_run(capsys, "vqvae", tmp_path / "vq", "--dataset", _write(tmp_path / "seven.npy", x=img))
    assert m["n_train"] == 6 and m["n_test"] == 1 and math.isfinite(m["test_negative_elbo"])
    assert sum(m["code_counts"]) == 4 * 4  # the one test image's latent grid
    m = tiny_run(capsys, "vae", tmp_path / "vae", "--dataset", _write(tmp_path / "eight.npy", x=np.r_[img, img[:1]]))
    assert m["n_test"] == 2 and math.isfinite(m["iwae_nll_k8"])  # the smallest dataset the VAE family takes


def _drop_root_override():
    """In the child before exec: CAP_DAC_OVERRIDE leaves the capability bounding set, so that the
    program, even as root, obeys permission bits (for root, a chmod alone leaves a directory writable)."""
    pr_capbset_drop, cap_dac_override = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_an_existing_read_only_out_is_refused_before_training(tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-m", "pyvae", "train", "--model", "vae", "--epochs", "1", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           preexec_fn=_drop_root_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:  # prctl refused: no CAP_SETPCAP here
        pytest.skip(f"cannot make a directory read-only for root here ({exc})")
    finally:
        out.chmod(0o755)
    assert r.returncode == 2 and r.stdout == "" and \
        r.stderr == f"pyvae train: error: --out {out}: cannot write into the directory (Permission denied)\n"
    assert not list(out.iterdir())


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyvae", "train", "--model", "vae", "--dataset", str(tmp_path / "x.npz")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"pyvae train: error: dataset file not found: {tmp_path / 'x.npz'} " \
                               "(--dataset takes 'digits' or an .npz/.npy file)"
    r = subprocess.run([sys.executable, "-m", "pyvae", "fit"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown command 'fit'" in r.stderr and "Traceback" not in r.stderr


def test_python_m_pyvae_still_prints_the_install_report():
    r = subprocess.run([sys.executable, "-m", "pyvae"], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.startswith(f"pyvae {pyvae.__version__}\n") and "cpu (" in r.stdout and "auto:" in r.stdout


# ------------------------------------------------------------------------------------ data
def test_array_files_are_read_in_every_layout(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.random((10, 3, 5, 6)).astype(np.float32)
    for name, array, expected in [
        ("nhwc.npy", nchw.transpose(0, 2, 3, 1), nchw),
        ("nchw.npy", nchw, nchw),
        ("nhw.npy", nchw[:, 0], nchw[:, :1]),
        ("u8.npy", (nchw * 255).astype(np.uint8), (nchw * 255).astype(np.uint8) / np.float32(255)),
        ("bool.npy", nchw > 0.5, (nchw > 0.5).astype(np.float32)),
    ]:
        images, labels = pdata.load_array_file(str(_write(tmp_path / name, x=array)))
        assert images.dtype == np.float32 and labels is None
        np.testing.assert_allclose(images, expected, rtol=1e-6, err_msg=name)
    # .npz: 'images' wins over an earlier array; labels by name; else the first non-label array
    labels = rng.integers(0, 4, 10)
    path = _write(tmp_path / "a.npz", other=nchw[:, :1] * 0, images=nchw, labels=labels)
    images, y = pdata.load_array_file(str(path))
    np.testing.assert_array_equal(images, nchw)
    np.testing.assert_array_equal(y, labels)
    images, y = pdata.load_array_file(str(_write(tmp_path / "b.npz", y=labels, pics=nchw)))
    np.testing.assert_array_equal(images, nchw)
    np.testing.assert_array_equal(y, labels)
    ds = pdata.load_dataset(str(tmp_path / "b.npz"))
    assert ds.input_shape == (3, 5, 6) and len(ds.x_test) == 2 and len(ds.x_train) == 8 and ds.num_classes == 4
    order = np.random.default_rng(pdata.SPLIT_SEED).permutation(10)
    np.testing.assert_array_equal(ds.x_test.numpy(), nchw[order[:2]])
    np.testing.assert_array_equal(ds.y_train.numpy(), labels[order[2:]])


def test_digits_dataset():
    x_train, x_test, y_train, _ = digits_split()
    ds = pdata.load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    np.testing.assert_allclose(ds.x_train.reshape(len(x_train), -1).numpy(), x_train, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test.reshape(len(x_test), -1).numpy(), x_test, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), y_train)
    binary = pdata.load_dataset("digits", binarize=True)
    np.testing.assert_array_equal(binary.x_test.reshape(len(x_test), -1).numpy(), (x_test >= 0.5).astype(np.float32))


def test_only_the_options_know_a_model_by_its_name():
    # The loop, the evaluation and the pictures ask the model (conditional, continuous_latent,
    # fixed_kl, evaluation_metrics, ...); only options.py's tables name models.
    package = os.path.dirname(ptrain.__file__)
    names = "|".join(map(re.escape, ptrain.MODELS))
    by_name = re.compile(rf"args\.model\s*(==|!=|\bin\b|\bnot in\b)|[\"']({names})[\"']")
    found = [f"{module}:{i}: {line.strip()}" for module in sorted(os.listdir(package))
             if module.endswith(".py") and module != "options.py"
             for i, line in enumerate(open(os.path.join(package, module)), 1) if by_name.search(line)]
    assert found == []


def test_batches_cover_the_data_and_split_between_ranks():
    one = ptrain.batches(103, 10, epoch=4, seed=7, world=1)
    assert torch.equal(torch.sort(torch.cat(one)).values, torch.arange(103))
    assert [len(b) for b in one] == [10] * 10 + [3]
    assert all(torch.equal(a, b) for a, b in zip(one, ptrain.batches(103, 10, epoch=4, seed=7, world=1)))
    assert not torch.equal(one[0], ptrain.batches(103, 10, epoch=5, seed=7, world=1)[0])
    four = ptrain.batches(103, 10, epoch=4, seed=7, world=4)  # the last 3 cannot give each of 4 ranks one
    assert len(four) == 10 and all(torch.equal(a, b) for a, b in zip(one, four))
    assert [len(s) for s in four[0].tensor_split(4)] == [3, 3, 2, 2]  # how train() shards a batch


# ------------------------------------------------------------------------------ processes
def _hashes(state: dict) -> dict:
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}


def torchrun(cwd, *argv) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m pyvae train ...`, as a user starts it, in ``cwd``
    (not the repository, whose pyvae/ would shadow the installed one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pyvae", "train", *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=240)


def test_two_process_torchrun_keeps_the_ranks_identical(capsys, tmp_path):
    # Bernoulli: the comparison with one process below is up to float rounding, and with the
    # digits' default discretized likelihood a code assignment near a tie flips between the two
    # (the ranks themselves stay identical: see test_two_process_weight_average_is_the_same_on_each_rank).
    argv = ["--model", "vqvae", *TINY["vqvae"], "--epochs", "1", "--batch-size", "95", "--quiet",
            "--likelihood", "bernoulli"]
    r = torchrun(tmp_path, *argv, "--out", tmp_path / "ddp", "--debug-rank-state")
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / "rank_state" / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]  # every parameter and buffer, the EMA codebook and its statistics included
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert _hashes(ckpt["model"]) == ranks[0]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == math.ceil(1438 / 95)
    # one process on the whole batches computes the same (up to the order of float sums)
    assert cli(capsys, "train", *argv, "--out", tmp_path / "one")[0] == 0
    single = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for k, v in single["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    np.testing.assert_allclose(ckpt["history"]["step_loss"], single["history"]["step_loss"], rtol=1e-4)


def test_two_process_weight_average_is_the_same_on_each_rank(tmp_path):
    # the vae's defaults: the discretized likelihood of the digits and a weight average
    r = torchrun(tmp_path, "--model", "vae", *TINY["vae"], "--epochs", "1", "--batch-size", "95", "--quiet",
                 "--iwae-k", "4", "--out", tmp_path / "ddp", "--debug-rank-state")
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / "rank_state" / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1] and "average" in ranks[0]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["args"]["likelihood"] == "dmol" and m["args"]["weight_ema"] > 0 and m["world_size"] == 2


@pytest.mark.slow
def test_twenty_torchrun_runs_in_a_row_all_succeed(tmp_path):
    # Issue 19: up to 1 run in 4 failed (here 2 in about 160): rank 1 was aborted at exit
    # ("terminate called without an active exception") when a gloo worker thread still had to release
    # its last collective's tensors as the interpreter finalized (see pyvae.train.Run.leave_together).
    for i in range(20):
        r = torchrun(tmp_path, "--model", "vqvae", *TINY["vqvae"], "--epochs", "1", "--batch-size", "95", "--quiet",
                     "--out", tmp_path / f"run{i}")
        assert r.returncode == 0, f"run {i + 1} of 20 failed:\n{r.stderr[-3000:]}"
        assert json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["world_size"] == 2
