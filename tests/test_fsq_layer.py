"""pyvae.nn.FSQ against vector-quantize-pytorch's FSQ (1.32): its README example, the same outputs,
indices, gradients and state for every supported constructor argument, and the arguments it refuses."""
import pytest
import torch

import pyvae
from pyvae.nn import FSQ

vqp = pytest.importorskip("vector_quantize_pytorch")

BACKENDS = ["torch", "cpu", "triton"]


def same_codes(got, want, levels_step=2.0, *, at_most=1e-3):
    """Equal up to a float32 ulp (symmetric codes are written as (level - c) / c, the peer's as
    2k / (L - 1) - 1), but for at most a fraction ``at_most`` of values one level apart: a value at a
    rounding boundary may round either way when tanh differs by an ulp between implementations."""
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = (got - want).abs() > 1e-6
    if differ.any():
        assert differ.float().mean() <= at_most, f"{int(differ.sum())} of {differ.numel()} values differ"
        assert (got - want)[differ].abs().max() <= levels_step + 1e-6


def pair(*args, **kwargs):
    """The peer and pyvae's layer, built from one seed (so their projections start equal)."""
    torch.manual_seed(0)
    peer = vqp.FSQ(*args, **kwargs)
    torch.manual_seed(0)
    ours = FSQ(*args, **kwargs)
    return peer, ours


def test_readme_example():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == x.shape and indices.shape == (1, 1024) and indices.dtype == torch.int32
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, shape", [
    (dict(levels=[8, 5, 5, 5]), (2, 300, 4)),
    (dict(levels=[8, 8, 8, 6, 5]), (2, 300, 5)),
    (dict(levels=[7, 5, 5, 5, 5], dim=32), (2, 100, 32)),  # projections
    (dict(levels=[8, 5, 5, 5], num_codebooks=2, dim=12), (2, 100, 12)),
    (dict(levels=[8, 5, 5, 5], channel_first=True), (2, 4, 100)),
    (dict(levels=[8, 5, 5, 5], dim=16), (2, 16, 6, 7)),  # an image feature map
    (dict(levels=[2, 3, 4], preserve_symmetry=True), (2, 300, 3)),
    (dict(levels=[8, 5, 5, 5], return_indices=False), (2, 300, 4)),
])
def test_same_outputs_indices_and_gradients_as_the_peer(backend, kwargs, shape):
    peer, ours = pair(**kwargs)
    ours.backend = backend
    assert ours.state_dict().keys() == peer.state_dict().keys()
    for k, v in peer.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert ours.codebook_size == peer.codebook_size if kwargs.get("return_indices", True) else True
    z = (2 * torch.randn(shape)).requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    out_p, idx_p = peer(z)
    out_o, idx_o = ours(z2)
    if idx_p is None:
        assert idx_o is None
    else:
        assert idx_o.dtype == idx_p.dtype == torch.int32 and idx_o.shape == idx_p.shape
        assert (idx_o != idx_p).float().mean() <= 1e-3
    if ours.has_projections:
        torch.testing.assert_close(out_o, out_p, rtol=1e-4, atol=1e-2)  # a flipped level moves the projection
    else:
        same_codes(out_o, out_p, 2.0 / 3)
    g = torch.randn_like(out_p)
    (out_p * g).sum().backward()
    (out_o * g).sum().backward()
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(peer.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-2, msg=name)


def test_codes_indices_and_the_implicit_codebook_match_the_peer():
    peer, ours = pair(levels=[8, 5, 5, 5])
    torch.testing.assert_close(ours.implicit_codebook, peer.implicit_codebook)
    idx = torch.randint(0, peer.codebook_size, (3, 17))
    torch.testing.assert_close(ours.indices_to_codes(idx), peer.indices_to_codes(idx))
    torch.testing.assert_close(ours.indices_to_level_indices(idx), peer.indices_to_level_indices(idx))
    codes = peer.implicit_codebook[torch.randint(0, peer.codebook_size, (50,))]
    assert torch.equal(ours.codes_to_indices(codes), peer.codes_to_indices(codes))
    z = torch.randn(4, 9, 4)
    same_codes(ours.quantize(z), peer.quantize(z), 2.0 / 3)


@pytest.mark.parametrize("kwargs, index_shape", [
    (dict(levels=[8, 5, 5, 5], dim=16), (2, 5, 6)),  # image indices: channel-first codes
    (dict(levels=[8, 5, 5, 5], channel_first=True), (2, 7)),
    (dict(levels=[8, 5, 5, 5], num_codebooks=2, dim=12), (2, 7, 2)),
    (dict(levels=[2, 3, 4], preserve_symmetry=True), (3, 11)),
])
def test_indices_round_trip_as_the_peers_do(kwargs, index_shape):
    peer, ours = pair(**kwargs)
    idx = torch.randint(0, peer.codebook_size, index_shape)
    torch.testing.assert_close(ours.indices_to_codes(idx), peer.indices_to_codes(idx))
    codes = peer.implicit_codebook[torch.randint(0, peer.codebook_size, (40,))]
    assert torch.equal(ours.codes_to_indices(codes), peer.codes_to_indices(codes))


def test_state_dict_loads_both_ways():
    peer, ours = pair(levels=[8, 5, 5, 5], dim=16)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(1.0)
    ours.load_state_dict(peer.state_dict())
    z = torch.randn(2, 10, 16)
    torch.testing.assert_close(ours(z)[0], peer(z)[0], rtol=1e-4, atol=1e-2)
    fresh = vqp.FSQ(levels=[8, 5, 5, 5], dim=16)
    fresh.load_state_dict(ours.state_dict())


def test_bfloat16_input_is_quantized_in_float32_and_returned_in_bfloat16():
    peer, ours = pair(levels=[8, 5, 5, 5])
    z = torch.randn(2, 200, 4).bfloat16()
    out_p, idx_p = peer(z)
    out_o, idx_o = ours(z)
    assert out_o.dtype == torch.bfloat16
    same_codes(out_o.float(), out_p.float(), 2.0 / 3)
    assert (idx_o != idx_p).float().mean() <= 1e-3


@pytest.mark.parametrize("name, value", [("noise_dropout", 0.1), ("bound_hard_clamp", True),
                                         ("orthogonal_rotation", True), ("force_quantization_f32", False)])
def test_unsupported_arguments_raise_naming_them(name, value):
    with pytest.raises(NotImplementedError, match=f"FSQ: {name}={value!r} is not supported"):
        FSQ([8, 5, 5, 5], **{name: value})


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels of 2 need preserve_symmetry=True"):
        FSQ([2, 5])
    with pytest.raises(ValueError, match="levels must be a non-empty sequence of ints >= 2"):
        FSQ([])
    with pytest.raises(ValueError, match="z must have dim = 4 features, got 5"):
        FSQ([8, 5, 5, 5])(torch.randn(1, 3, 5))


# ------------------------------------------------------------------------------ in the VQ-VAE
def test_vqvae_with_fsq_trains_through_the_straight_through_gradient():
    from pyvae.models import VQVAE

    torch.manual_seed(0)
    model = VQVAE((1, 8, 8), quantizer="fsq", levels=(5, 5, 3), channels=(8, 8), downsample=1)
    assert model.code_dim == 3 and model.num_codes == 75 and isinstance(model.vq, FSQ)
    x = (torch.rand(16, 1, 8, 8) > 0.5).float()
    out = model(x)
    assert out.indices.shape == (16, 4, 4) and out.indices.dtype == torch.int64 and float(out.vq_loss) == 0
    assert 1 <= float(out.perplexity) <= 75
    out.loss.backward()
    assert model.encoder[-1].weight.grad.abs().sum() > 0  # through FSQ's rounding
    model.eval()
    torch.testing.assert_close(model.decode_indices(model.encode_indices(x)), model.decode(model.encode(x)))
    assert model.evaluation_metrics(x, x_train=x)["num_codes"] == 75
    assert model.fixed_kl == pytest.approx(16 * torch.log(torch.tensor(75.0)).item())


def test_vqvae_fsq_refuses_codebook_options():
    from pyvae.models import VQVAE

    with pytest.raises(ValueError, match="num_codes: options of quantizer='vq' only"):
        VQVAE((1, 8, 8), quantizer="fsq", num_codes=16)
    with pytest.raises(ValueError, match=r"code_dim must be len\(levels\) = 4"):
        VQVAE((1, 8, 8), quantizer="fsq", code_dim=16)
    with pytest.raises(ValueError, match="quantizer must be 'vq' or 'fsq'"):
        VQVAE((1, 8, 8), quantizer="rvq")


def test_pyvae_train_vqvae_with_fsq(capsys, tmp_path):
    import json

    from test_train import TINY, cli

    argv = ["train", "--model", "vqvae", "--channels", "8,8", "--epochs", "1", "--quiet", "--quantizer", "fsq"]
    rc, _, err = cli(capsys, *argv, "--levels", "5,5,3", "--out", tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_codes"] == 75 and m["args"]["levels"] == [5, 5, 3] and m["args"]["num_codes"] is None
    rc, _, err = cli(capsys, *argv, "--num-codes", "8", "--out", tmp_path / "b")
    assert rc == 2 and "--num-codes: not options of --quantizer fsq" in err
    rc, _, err = cli(capsys, "train", "--model", "vqvae", *TINY["vqvae"], "--levels", "5,5", "--out", tmp_path / "c")
    assert rc == 2 and "--levels applies to --quantizer fsq only" in err
    rc, _, err = cli(capsys, "train", "--model", "vae", "--quantizer", "fsq", "--out", tmp_path / "d")
    assert rc == 2 and "--quantizer does not apply to --model vae" in err
