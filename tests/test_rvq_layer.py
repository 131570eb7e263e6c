"""pyvae.nn.ResidualVQ against vector-quantize-pytorch 1.32's ResidualVQ: state_dicts (both ways, one
seed one initial state), eval outputs, training steps (outputs, losses, gradients, EMA state), quantize
dropout, the index API, the README examples; the fused path (one residual_quantize call)."""
from __future__ import annotations

import pytest
import torch

import pyvae
import pyvae.nn.rvq_compat as rvq_compat

from tolerances import assert_nearest_codes, assert_states_close

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch (the peer) is not installed")

UNEQUAL = dict(codebook_size=(8, 16, 8), num_quantizers=None)


def _options(options: dict) -> dict:
    out = dict(dim=8, num_quantizers=3, codebook_size=16)
    out.update(options)
    if out.get("num_quantizers", 0) is None:
        del out["num_quantizers"]
    return out


def _pair(**options):
    """vector-quantize-pytorch's ResidualVQ and pyvae's, built from one seed."""
    options = _options(options)
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(**options)
    torch.manual_seed(0)
    ours = pyvae.nn.ResidualVQ(**options)
    return theirs, ours


def _input(options: dict, batch: int = 2) -> torch.Tensor:
    if options.get("accept_image_fmap"):
        return torch.randn(batch, 8, 8, 8)  # vector-quantize-pytorch 1.32 needs C == H == W here
    if options.get("channel_last") is False:
        return torch.randn(batch, 8, 8)  # and dim == N here
    return torch.randn(batch, 12, 8)


# --------------------------------------------------------------------------- state
@pytest.mark.parametrize("options", [dict(), dict(codebook_dim=4), dict(shared_codebook=True), dict(kmeans_init=True),
                                     dict(use_cosine_sim=True), UNEQUAL], ids=str)
def test_state_dict_matches_and_loads_both_ways(options):
    theirs, ours = _pair(**options)
    assert list(dict(theirs.named_modules())) == list(dict(ours.named_modules()))
    assert_states_close(theirs, ours, rtol=0, atol=0)  # one seed, one initial state
    torch.manual_seed(5)
    other = vqp.ResidualVQ(**_options(options))
    ours.load_state_dict(other.state_dict())
    assert_states_close(other, ours, rtol=0, atol=0)
    torch.manual_seed(6)
    mine = pyvae.nn.ResidualVQ(**_options(options))
    theirs.load_state_dict(mine.state_dict())
    assert_states_close(theirs, mine, rtol=0, atol=0)
    if options.get("shared_codebook"):
        assert all(layer._codebook is ours.layers[0]._codebook for layer in ours.layers)


# --------------------------------------------------------------------------- eval
@pytest.mark.parametrize("options", [
    dict(), dict(codebook_dim=4), dict(accept_image_fmap=True), dict(channel_last=False), dict(shared_codebook=True),
    dict(use_cosine_sim=True), UNEQUAL, dict(quantize_dropout=True),
], ids=str)
@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_eval_matches(options, two_d):
    if two_d and (options.get("accept_image_fmap") or options.get("channel_last") is False):
        pytest.skip("[B, dim] input is the same in these modes")
    theirs, ours = _pair(**options)
    theirs.eval(), ours.eval()
    x = (torch.randn(7, 8) if two_d else _input(options)).requires_grad_()
    (q1, i1, l1, c1), (q2, i2, l2, c2) = theirs(x, return_all_codes=True), ours(x, return_all_codes=True)
    assert i1.shape == i2.shape and i1.dtype == i2.dtype == torch.int64 and torch.equal(i1, i2)
    assert (i2 >= 0).all()  # no quantize dropout in eval mode
    assert q1.shape == q2.shape == x.shape and q1.dtype == q2.dtype
    torch.testing.assert_close(q2, q1)
    assert l2.shape == l1.shape == (3,) and l2.dtype == l1.dtype and not l1.any() and not l2.any()
    assert c2.shape == c1.shape
    torch.testing.assert_close(c2, c1)
    # no gradient reaches x in eval mode (project_out's parameters still get theirs)
    assert q1.requires_grad == q2.requires_grad
    if q2.requires_grad:
        assert torch.autograd.grad(q2.sum(), x, allow_unused=True)[0] is None


def test_other_image_and_sequence_shapes():
    # vector-quantize-pytorch 1.32 fails here (its indices start as input_shape[:-1]); the shapes it
    # means: indices [B, H, W, Q] / [B, N, Q]; the projections act on the channels
    image = pyvae.nn.ResidualVQ(dim=6, codebook_dim=4, num_quantizers=3, codebook_size=8, accept_image_fmap=True)
    image.eval()
    x = torch.randn(2, 6, 3, 5)
    q, i, l = image(x)
    assert q.shape == x.shape and i.shape == (2, 3, 5, 3) and l.shape == (3,)
    flat = x.flatten(2).transpose(1, 2)
    expected = image.project_out(image.get_codes_from_indices(i).sum(0)).permute(0, 3, 1, 2)
    torch.testing.assert_close(q, expected)
    seq = pyvae.nn.ResidualVQ(dim=6, codebook_dim=4, num_quantizers=3, codebook_size=8, channel_last=False)
    seq.load_state_dict(image.state_dict())
    seq.eval()
    q2, i2, _ = seq(flat.transpose(1, 2))
    q1, i1, _ = image(x)
    assert i2.shape == (2, 15, 3) and torch.equal(i2, i1.reshape(2, 15, 3))
    torch.testing.assert_close(q2, q1.flatten(2))


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("options", [
    dict(), dict(rotation_trick=False, commitment_weight=0.5), dict(codebook_dim=4, decay=0.9),
    dict(shared_codebook=True), dict(shared_codebook=True, rotation_trick=False),
    dict(use_cosine_sim=True, decay=0.9), dict(use_cosine_sim=True, shared_codebook=True, rotation_trick=False),
    dict(UNEQUAL, rotation_trick=False), dict(accept_image_fmap=True, eps=1e-3),
    dict(channel_last=False, rotation_trick=False),
], ids=str)
def test_training_steps_match(options):
    theirs, ours = _pair(**options)
    for step in range(3):
        x = _input(options)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (q1, i1, l1), (q2, i2, l2) = theirs(x1), ours(x2)
        assert torch.equal(i1, i2), step
        torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-5)
        assert l2.shape == l1.shape == (3,) and l2.dtype == l1.dtype
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-7)
        g = torch.randn_like(q1)
        w = torch.randn(3)  # each stage's loss with its own weight: the per-stage gradients
        g1 = torch.autograd.grad((q1 * g).sum() + (l1 * w).sum(), [x1, *theirs.parameters()])
        g2 = torch.autograd.grad((q2 * g).sum() + (l2 * w).sum(), [x2, *ours.parameters()])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert_states_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotation_trick", [False, True])
def test_gradient_to_x_is_per_stage(rotation_trick):
    # vector-quantize-pytorch's quirk, kept: without the rotation trick each stage sends the gradient of
    # quantized straight through to its residual x - (constants), so d quantized / dx = Q_active * I
    _, ours = _pair(rotation_trick=rotation_trick, commitment_weight=0.0)
    x = torch.randn(2, 12, 8, requires_grad=True)
    q, _, loss = ours(x)
    g = torch.randn_like(q)
    grad = torch.autograd.grad((q * g).sum() + loss.sum(), x)[0]
    if not rotation_trick:
        torch.testing.assert_close(grad, 3 * g)
    else:
        assert not torch.allclose(grad, 3 * g, rtol=1e-2, atol=1e-2)


def test_fused_path_is_one_residual_quantize_call(monkeypatch):
    calls = []
    real = rvq_compat.residual_quantize

    def counting(x, codebooks, **kwargs):
        calls.append(tuple(codebooks.shape))
        return real(x, codebooks, **kwargs)

    def no_single_stage_search(*args, **kwargs):
        raise AssertionError("a stage was searched on its own")

    monkeypatch.setattr(rvq_compat, "residual_quantize", counting)
    monkeypatch.setattr("pyvae.nn.vq.vector_quantize", no_single_stage_search)
    theirs, ours = _pair(num_quantizers=4)
    for mode in (True, False):
        theirs.train(mode), ours.train(mode)
        x = torch.randn(2, 12, 8)
        (q1, i1, _), (q2, i2, _) = theirs(x), ours(x)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-5)
    assert calls == [(4, 16, 8), (4, 16, 8)]


def test_ema_codebook_snapshot_is_what_backward_sees():
    # the EMA step rewrites each codebook after forward; backward (commitment and rotation gradients)
    # uses the codes of the forward: the same gradients as with a frozen copy of the layer
    _, ours = _pair(decay=0.5)
    frozen = pyvae.nn.ResidualVQ(**_options(dict(decay=0.5)))
    frozen.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    q1, _, l1 = ours(x1)
    q2, _, l2 = frozen(x2, freeze_codebook=True)
    assert not torch.equal(ours.codebooks, frozen.codebooks)
    g = torch.randn_like(q1)
    torch.testing.assert_close(torch.autograd.grad((q1 * g).sum() + l1.sum(), x1)[0],
                               torch.autograd.grad((q2 * g).sum() + l2.sum(), x2)[0])


@pytest.mark.parametrize("shared", [False, True])
def test_freeze_codebook_matches(shared):
    theirs, ours = _pair(shared_codebook=shared, decay=0.5)
    x = torch.randn(2, 12, 8)
    theirs(x), ours(x)  # one step, so that the EMA state is not the initial one
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    (q1, i1, l1), (q2, i2, l2) = theirs(x + 0.3, freeze_codebook=True), ours(x + 0.3, freeze_codebook=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(l2, l1)
    assert_states_close(theirs, ours, rtol=1e-5, atol=1e-6)
    for key, value in ours.state_dict().items():
        if "cluster_size" in key or "embed_avg" in key:
            assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- quantize dropout
@pytest.mark.parametrize("options", [dict(), dict(quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
                                     dict(use_cosine_sim=True)], ids=str)
def test_quantize_dropout_matches(options):
    theirs, ours = _pair(quantize_dropout=True, num_quantizers=5, **options)
    seen = set()
    for step in range(6):
        x = torch.randn(2, 12, 8)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        q1, i1, l1 = theirs(x1)
        torch.manual_seed(100 + step)
        q2, i2, l2 = ours(x2)
        assert torch.equal(i1, i2), step
        active = int((i2[0, 0] >= 0).sum())
        seen.add(active)
        assert (i2[..., active:] == -1).all() and (i2[..., :active] >= 0).all()
        assert not l2[active:].any()
        torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-7)
        g = torch.randn_like(q1)
        torch.testing.assert_close(torch.autograd.grad((q2 * g).sum() + l2.sum(), x2)[0],
                                   torch.autograd.grad((q1 * g).sum() + l1.sum(), x1)[0], rtol=1e-4, atol=1e-5)
        assert_states_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # the dropped stages are reconstructed from fewer indices
        torch.testing.assert_close(ours.get_output_from_indices(i2[..., :active]),
                                   theirs.get_output_from_indices(i1[..., :active]))
    assert len(seen) > 1
    # a fixed seed fixes the index, as there
    (_, i1, _), (_, i2, _) = theirs(x, rand_quantize_dropout_fixed_seed=7), ours(x, rand_quantize_dropout_fixed_seed=7)
    assert torch.equal(i1, i2)


def test_codes_from_indices_match():
    theirs, ours = _pair(quantize_dropout=True, num_quantizers=4)
    idx = torch.randint(0, 16, (2, 5, 4))
    idx[0, :, 2:] = -1
    for indices in (idx, idx[..., :2]):
        torch.testing.assert_close(ours.get_codes_from_indices(indices), theirs.get_codes_from_indices(indices))
        torch.testing.assert_close(ours.get_output_from_indices(indices), theirs.get_output_from_indices(indices))
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)
    assert ours.codebook_size == theirs.codebook_size == 16
    _, unequal = _pair(**UNEQUAL)
    assert isinstance(unequal.codebooks, tuple) and [c.shape[0] for c in unequal.codebooks] == [8, 16, 8]
    with pytest.raises(ValueError, match="quantize_dropout"):
        pyvae.nn.ResidualVQ(**_options({})).get_codes_from_indices(idx[..., :2])


# --------------------------------------------------------------------------- k-means, dead codes
def test_kmeans_init_runs_per_stage_on_its_residual():
    torch.manual_seed(0)
    centers = torch.randn(4, 6) * 4
    x = (centers.repeat(16, 1) + 0.3 * torch.randn(64, 6)).reshape(4, 16, 6)
    ours = pyvae.nn.ResidualVQ(dim=6, num_quantizers=2, codebook_size=4, kmeans_init=True, kmeans_iters=50)
    ours.eval()
    ours(x)  # as vector-quantize-pytorch: the first forward initialises, in any mode
    assert all(layer._codebook.initted for layer in ours.layers)
    flat = x.reshape(-1, 6)
    r = flat
    for layer in ours.layers:  # a k-means fixed point of each stage's residual
        assign = torch.cdist(r, layer.codebook).argmin(1)
        for k in assign.unique():
            torch.testing.assert_close(layer.codebook[k], r[assign == k].mean(0), rtol=1e-4, atol=1e-4)
        r = r - layer.codebook[assign]
    # an initialised vector-quantize-pytorch state is not initialised again, and runs the same
    theirs = vqp.ResidualVQ(dim=6, num_quantizers=2, codebook_size=4, kmeans_init=True)
    theirs(x)
    fresh = pyvae.nn.ResidualVQ(dim=6, num_quantizers=2, codebook_size=4, kmeans_init=True)
    fresh.load_state_dict(theirs.state_dict())
    fresh.eval(), theirs.eval()
    (q1, i1, _), (q2, i2, _) = theirs(x + 1.0), fresh(x + 1.0)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q2, q1)


@pytest.mark.parametrize("shared", [False, True])
def test_dead_codes_restart_at_rows_of_their_stage_residual(shared):
    ours = pyvae.nn.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, threshold_ema_dead_code=0.6,
                               shared_codebook=shared, decay=0.5, rotation_trick=False)
    x = torch.randn(1, 20, 4)
    before = ours.codebooks.clone()
    _, idx, _ = ours(x)
    rows = x.reshape(-1, 4)
    residuals = [rows, rows - before[0][idx.reshape(-1, 2)[:, 0]]]
    for q, layer in enumerate(ours.layers[:1] if shared else ours.layers):
        counts = layer._codebook.ema_counts
        restarted = counts == 0.6  # unused codes decay to 0.5, below the threshold
        assert restarted.any()
        stage_rows = torch.cat(residuals[q:] if shared else residuals[q:q + 1])
        for code in layer.codebook[restarted]:
            assert (stage_rows - code).abs().amax(1).min() < 1e-4 * (1 + code.abs().max())  # a row itself


# --------------------------------------------------------------------------- the README
def _assert_residual_chain_nearest(x: torch.Tensor, codebooks: torch.Tensor, idx: torch.Tensor) -> None:
    """Each stage's code is the nearest (within float32 rounding) to its residual."""
    r = x.reshape(-1, codebooks.shape[-1])
    flat = idx.reshape(-1, codebooks.shape[0])
    for q in range(codebooks.shape[0]):
        assert_nearest_codes(r, codebooks[q], flat[:, q])
        r = r - codebooks[q][flat[:, q]]


def test_readme_examples():
    torch.manual_seed(0)
    x = torch.randn(1, 1024, 256)
    torch.manual_seed(1)
    theirs = vqp.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    torch.manual_seed(1)
    residual_vq = pyvae.nn.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    theirs.eval(), residual_vq.eval()
    # 1024 random codes of 256 dims: a few rows have two codes within float32 rounding of the
    # nearest, which the searches may resolve differently; every choice is a nearest code
    (q1, i1, l1), (q2, i2, l2) = theirs(x), residual_vq(x)
    agree = (i1 == i2).all(-1)
    assert agree.float().mean() > 0.99
    torch.testing.assert_close(q2[agree], q1[agree])
    assert torch.equal(l1, l2)
    for idx in (i1, i2):
        _assert_residual_chain_nearest(x[~agree], residual_vq.codebooks, idx[~agree])
    residual_vq.train()
    quantized, indices, commit_loss, all_codes = residual_vq(x, return_all_codes=True)
    # the README prints (1, 8) for the losses; vector-quantize-pytorch 1.32 returns (8,), as pyvae
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
    assert all_codes.shape == (8, 1, 1024, 256)

    residual_vq = pyvae.nn.ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 4) and commit_loss.shape == (4,)

    with pytest.raises(NotImplementedError, match="stochastic_sample_codes"):
        pyvae.nn.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                            sample_codebook_temp=0.1, shared_codebook=True)
    residual_vq = pyvae.nn.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, shared_codebook=True)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)

    residual_vq = pyvae.nn.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, quantize_dropout=True)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8)
    residual_vq = pyvae.nn.ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, accept_image_fmap=True)
    quantized, indices, commit_loss = residual_vq(torch.randn(1, 256, 32, 32))
    assert quantized.shape == (1, 256, 32, 32) and indices.shape == (1, 32, 32, 4) and commit_loss.shape == (4,)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("name,value", [
    ("heads", 2), ("diveq", True), ("implicit_neural_codebook", True), ("beam_size", 2), ("quant_grad_frac", 0.5),
    ("stochastic_sample_codes", True), ("learnable_codebook", True), ("orthogonal_reg_weight", 0.1),
    ("return_zeros_for_masked_padding", False), ("mlp_kwargs", dict(depth=2)), ("ema_update", False),
])
def test_unsupported_arguments_raise(name, value):
    with pytest.raises(NotImplementedError, match=name):
        pyvae.nn.ResidualVQ(**_options({name: value}))


def test_defaults_and_bad_calls():
    layer = pyvae.nn.ResidualVQ(**_options(dict(heads=1, beam_size=None, quant_grad_frac=0.0, diveq=False,
                                                 learnable_codebook=False, sync_codebook=None)))
    assert all(stage.rotation_trick for stage in layer.layers)
    assert layer.layers[0]._codebook.ema_decay == 0.8 and layer.layers[0]._codebook.beta == 1.0
    with pytest.raises(TypeError, match="no_such_option"):
        pyvae.nn.ResidualVQ(**_options(dict(no_such_option=1)))
    for name, value in (("mask", torch.ones(2, 3, dtype=torch.bool)), ("indices", torch.zeros(2, 3, 3)),
                        ("beam_size", 2)):
        with pytest.raises(NotImplementedError, match=name):
            layer(torch.randn(2, 3, 8), **{name: value})
    with pytest.raises(ValueError, match="dim = 8"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="num_quantizers"):
        pyvae.nn.ResidualVQ(dim=8, codebook_size=16)
    q, _, _ = layer(torch.randn(2, 3, 8), sample_codebook_temp=0.5)  # no effect, as there
    assert q.shape == (2, 3, 8)
