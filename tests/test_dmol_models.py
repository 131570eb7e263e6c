"""The discretized likelihood in the model layer and the trainer: pyvae.nn.DiscretizedMixLogistic,
the models with likelihood="dmol", the datasets' levels, the categorical baseline, `pyvae train`'s
choice of likelihood and its weight average."""
import json
import math

import numpy as np
import pytest
import torch

import pyvae
from pyvae import data as pdata
from pyvae.models import CVAE, VAE, VQVAE, ConvVAE, HierarchicalVAE
from pyvae.nn import DiscretizedMixLogistic
from pyvae.train.average import WeightAverage
from pyvae.train.evaluate import categorical_baseline
from pyvae.train.options import DMOL_NUM_MIX

from test_train import TINY, cli, digits_split

LEVELS = 17


def grid_images(shape, levels=LEVELS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float() / (levels - 1)


# ------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("channels", [1, 3])
def test_layer_is_the_op_on_data_in_the_unit_interval(channels):
    layer = DiscretizedMixLogistic(4, channels, LEVELS, reduction="per_sample")
    x = grid_images((3, channels, 5, 6))
    params = torch.randn(3, *layer.param_shape(tuple(x.shape[1:])), requires_grad=True)
    assert params.shape[1] == (12 if channels == 1 else 40)
    got = layer(params, x)
    want = pyvae.discretized_mix_logistic_nll(params, x * 2 - 1, num_mix=4, num_classes=LEVELS, reduction="per_sample",
                                              backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # integer class indices are the same data
    torch.testing.assert_close(layer(params, torch.round(x * (LEVELS - 1)).long()), got)
    got.sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0


def test_layer_sample_is_seeded_on_the_grid_and_the_ops_sample():
    layer = DiscretizedMixLogistic(3, 3, LEVELS)
    params = torch.randn(2, 30, 4, 4)
    a, b = layer.sample(params, seed=5), layer.sample(params, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, layer.sample(params, seed=6))
    assert a.shape == (2, 3, 4, 4) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a * (LEVELS - 1), torch.round(a * (LEVELS - 1)), rtol=0, atol=1e-5)
    op = pyvae.discretized_mix_logistic_sample(params, num_mix=3, channels=3, seed=5)
    assert torch.equal(torch.round(a * (LEVELS - 1)).long(), pyvae.ops.dmol.quantize(op, LEVELS))
    mean = layer.mean(params)
    assert mean.shape == (2, 3, 4, 4) and mean.min() >= 0 and mean.max() <= 1


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channels must be 1"):
        DiscretizedMixLogistic(2, 2)
    with pytest.raises(ValueError, match="num_mix must be a positive int"):
        DiscretizedMixLogistic(0, 1)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        DiscretizedMixLogistic(2, 1, 1)
    with pytest.raises(ValueError, match=r"channels = 3"):
        DiscretizedMixLogistic(2, 3).param_shape((1, 8, 8))
    layer = DiscretizedMixLogistic(2, 1, LEVELS)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # 1.5 in [0, 1] terms is 2 on the op's grid
        layer(torch.zeros(1, 6, 2, 2), torch.full((1, 1, 2, 2), 1.5))


# ------------------------------------------------------------------------------ the models
MODELS = {
    "vae": lambda **kw: VAE((1, 8, 8), hidden_dims=(32,), latent_dim=4, **kw),
    "cvae": lambda **kw: CVAE((1, 8, 8), 3, hidden_dims=(32,), latent_dim=4, **kw),
    "convvae": lambda **kw: ConvVAE((1, 8, 8), channels=(4, 8), hidden_dim=16, latent_dim=4, **kw),
    "hvae": lambda **kw: HierarchicalVAE((1, 8, 8), hidden_dims=(32,), latent_dims=(4, 2), **kw),
    "vqvae": lambda **kw: VQVAE((1, 8, 8), channels=(8, 8), num_codes=8, code_dim=4, **kw),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_decode_to_the_mixtures_parameters_and_train(name):
    torch.manual_seed(0)
    model = MODELS[name](likelihood="dmol", num_mix=3, num_levels=LEVELS)
    assert model.param_shape == (9, 8, 8) and isinstance(model.recon_likelihood, DiscretizedMixLogistic)
    x = grid_images((6, 1, 8, 8))
    y = torch.arange(6) % 3 if model.conditional else None
    out = model(x, y)
    assert out.recon_loss.shape == (6,) and torch.isfinite(out.loss)
    assert out.recon.shape == x.shape and out.recon.min() >= 0 and out.recon.max() <= 1
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("decoder"))
    # the reconstruction term is the discretized likelihood of the decoder's output
    model.eval()
    if name in ("vae", "cvae", "convvae"):
        mu = model.encode(x, y)
        params = model._params(mu, y)
        want = pyvae.discretized_mix_logistic_nll(params, x * 2 - 1, num_mix=3, num_classes=LEVELS,
                                                  reduction="per_sample", backend="torch")
        torch.testing.assert_close(model(x, y).recon_loss, want, rtol=1e-5, atol=1e-4)
    metrics = model.evaluation_metrics(x, y, x_train=x, iwae_k=2)
    assert metrics["test_bits_per_dim"] == pytest.approx(metrics["test_negative_elbo"] / (64 * math.log(2)))


@pytest.mark.parametrize("name", ["vae", "hvae"])
def test_sample_draws_pixels_with_the_fused_sampler(name):
    model = MODELS[name](likelihood="dmol", num_mix=3, num_levels=LEVELS).eval()
    a = model.sample(5, generator=torch.Generator().manual_seed(1))
    b = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (5, 1, 8, 8)
    assert torch.equal(a * (LEVELS - 1), torch.round(a * (LEVELS - 1)))  # on the grid: draws, not means
    assert not torch.equal(a, model.sample(5, generator=torch.Generator().manual_seed(2)))


def test_dmol_needs_one_or_three_channels():
    with pytest.raises(ValueError, match=r"C = 1 or 3 channels, got \(2, 4, 4\)"):
        VAE((2, 4, 4), likelihood="dmol")
    with pytest.raises(ValueError, match=r"C = 1 or 3 channels, got \(64,\)"):
        VAE(64, likelihood="dmol")


def test_activation_is_checked_and_used():
    with pytest.raises(ValueError, match="activation must be one of"):
        VAE((1, 8, 8), activation="tanh")
    model = HierarchicalVAE((1, 8, 8), activation="elu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ELU" in kinds and "ReLU" not in kinds


# ------------------------------------------------------------------------------ data and baseline
def test_datasets_know_their_levels(tmp_path):
    assert pdata.load_dataset("digits").num_levels == 17
    assert pdata.load_dataset("digits", binarize=True).num_levels == 2
    rng = np.random.default_rng(0)
    np.save(tmp_path / "u8.npy", rng.integers(0, 256, (10, 4, 4), dtype=np.uint8))
    np.save(tmp_path / "coarse.npy", (rng.integers(0, 5, (10, 4, 4)) / 4).astype(np.float32))
    np.save(tmp_path / "cont.npy", rng.random((10, 4, 4), dtype=np.float32))
    assert pdata.load_dataset(str(tmp_path / "u8.npy")).num_levels == 256
    assert pdata.load_dataset(str(tmp_path / "coarse.npy")).num_levels == 5
    assert pdata.load_dataset(str(tmp_path / "cont.npy")).num_levels is None


def test_categorical_baseline_is_add_one_smoothed_pixel_frequencies():
    data = pdata.load_dataset("digits")
    nll, info = categorical_baseline(data)
    x_train, x_test, _, _ = digits_split()
    k_train, k_test = np.rint(x_train * 16).astype(int), np.rint(x_test * 16).astype(int)
    want = np.zeros(len(k_test))
    for d in range(64):
        counts = np.bincount(k_train[:, d], minlength=17)
        want -= np.log((counts[k_test[:, d]] + 1) / (len(k_train) + 17))
    np.testing.assert_allclose(nll.numpy(), want, rtol=1e-12)
    assert info["distribution"] == "categorical" and info["levels"] == 17


# ------------------------------------------------------------------------------ the trainer
def test_the_digits_train_with_the_discretized_likelihood_by_default(capsys, tmp_path):
    rc, out, err = cli(capsys, "train", "--model", "vae", *TINY["vae"], "--epochs", "1", "--iwae-k", "2", "--quiet",
                       "--out", tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["args"]["likelihood"] == "dmol" and m["args"]["num_mix"] == DMOL_NUM_MIX["vae"]
    assert m["baseline"]["distribution"] == "categorical"
    dims = 64 * math.log(2)
    assert m["test_bits_per_dim"] == pytest.approx(m["test_negative_elbo"] / dims)
    assert m["baseline"]["test_bits_per_dim"] == pytest.approx(m["baseline"]["test_nll"] / dims)
    assert "bits/dim" in out


def test_binary_data_keeps_the_bernoulli_likelihood(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--model", "vae", *TINY["vae"], "--epochs", "1", "--iwae-k", "2", "--quiet",
                     "--binarize", "--out", tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["args"]["likelihood"] == "bernoulli" and m["args"]["num_mix"] is None
    assert m["baseline"]["distribution"] == "bernoulli" and "test_bits_per_dim" not in m


@pytest.mark.parametrize("argv, message", [
    (["--likelihood", "bernoulli", "--num-mix", "3"], "--num-mix applies to --likelihood dmol only"),
    (["--binarize", "--num-mix", "3"], "--num-mix applies to --likelihood dmol only (this run's likelihood is bernoulli)"),
    (["--weight-ema", "1"], "argument --weight-ema: expected a number in [0, 1), got '1'"),
    (["--activation", "tanh"], "argument --activation: invalid choice: 'tanh'"),
])
def test_bad_likelihood_options_get_one_line(capsys, tmp_path, argv, message):
    rc, _, err = cli(capsys, "train", "--model", "vae", "--epochs", "1", "--out", tmp_path, *argv)
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_dmol_of_continuous_data_is_refused(capsys, tmp_path):
    np.save(tmp_path / "cont.npy", np.random.default_rng(0).random((20, 4, 4), dtype=np.float32))
    rc, _, err = cli(capsys, "train", "--model", "vae", "--dataset", tmp_path / "cont.npy", "--likelihood", "dmol",
                     "--out", tmp_path / "out")
    assert rc == 2 and "--likelihood dmol needs pixel values on a grid of levels" in err, err


# ------------------------------------------------------------------------------ the weight average
def test_weight_average_follows_the_ramped_decay_and_is_applied_only_inside():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.9)
    want = [p.detach().clone() for p in model.parameters()]
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (t + 1))
        average.update(model)
        decay = min(0.9, (1 + t) / (10 + t))
        want = [decay * w + (1 - decay) * p.detach() for w, p in zip(want, model.parameters())]
    for got, w in zip(average.params, want):
        torch.testing.assert_close(got, w)
    last = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError), average.applied(model):
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p, w)
        raise RuntimeError("the model is restored even so")
    for p, w in zip(model.parameters(), last):
        assert torch.equal(p, w)
    other = WeightAverage(torch.nn.Linear(3, 3), 0.9)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(average.state_dict())
