"""Benchmark of pyvae's latent-diffusion posterior (``pyvae.nn.DiagonalGaussianDistribution``)
against diffusers' (0.42), and of one ``AutoencoderKL`` training step with each.

Posterior cases: ``parameters`` ``[8, 8, 64, 64]`` (Stable Diffusion's latents of 512x512 images)
and ``[8, 8, 128, 128]`` (1024x1024); ``sample()`` then ``kl()`` on one posterior, forward and
forward+backward (the gradient of ``z.sum() + kl.sum()`` to the parameters). The floor: pyvae's
packed op reads the parameters (mean and log-variance, 4 B an element each, the clamp done in
registers) and writes z forward, then reads the parameters again, regenerates the seed's noise
(z's gradient, an expanded scalar here, is read in place) and writes the parameters' gradient as
one tensor backward: 3 latent-sized passes of memory each way, and the Philox noise twice, which
on two CPU cores costs more than the memory; diffusers' eager chain makes about ten passes forward
(chunk, clamp, exp twice, randn, multiply-add, the KL's four elementwise ops and its sum), keeps
std, var and the noise for backward, and ends its backward with chunk's cat of the two halves'
gradients.

The step case: a small ``AutoencoderKL`` (two blocks of 32 and 64 channels, 4 latent channels, one
layer per block) on ``[4, 3, 64, 64]`` images, one Adam step of MSE reconstruction + 1e-6 KL, with
diffusers' posterior and with pyvae's (``use_pyvae_posterior``, switched on and off on the same model
before each step): the convolutions dominate, so the target is "never slower".
"""
from __future__ import annotations

import torch

from harness import Case, Row, time_case

OP = "posterior"


def _diffusers():
    try:
        import diffusers
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    except ImportError:
        return None, None
    return diffusers, DiagonalGaussianDistribution


def shapes(full: bool) -> list[tuple[int, ...]]:
    return [(8, 8, 64, 64)] + ([(8, 8, 128, 128)] if full else [])


def _posterior_step(cls, params: torch.Tensor, mode: str):
    def forward():
        with torch.no_grad():
            post = cls(params)
            return post.sample(), post.kl()

    def forward_backward():
        post = cls(params)
        z = post.sample()
        (z.sum() + post.kl().sum()).backward()
        params.grad = None

    return forward if mode == "forward" else forward_backward


def _autoencoder(diffusers, device: str):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                   layers_per_block=1, sample_size=64).to(device)


def _training_step(vae, x: torch.Tensor):
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def step():
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _time(case: Case, device: str) -> list[Row]:
    """time_case with diffusers as the "eager" baseline of the speed-up column, named as itself."""
    rows = time_case(case, device)
    for row in rows:
        if row.provider == "eager":
            row.provider = "diffusers"
    return rows


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    from pyvae.integrations.diffusers import use_pyvae_posterior
    from pyvae.nn import DiagonalGaussianDistribution

    rows: list[Row] = []
    diffusers, theirs = _diffusers()
    if diffusers is None:
        print("[bench] posterior: diffusers is not installed; skipped")
        return rows
    gen = torch.Generator().manual_seed(0)
    for shape in shapes(full):
        params = torch.randn(shape, generator=gen).to(device)
        latent = params.numel() // 2
        for mode in ("forward", "forward+backward"):
            params.requires_grad_(mode != "forward")
            steps = {"eager": _posterior_step(theirs, params, mode),
                     "pyvae": _posterior_step(DiagonalGaussianDistribution, params, mode)}
            # the packed op's: forward reads the parameters (mean and log-variance) and writes z;
            # backward reads the parameters and z's gradient and writes the parameters' gradient
            traffic = 4 * 3 * latent + (4 * 5 * latent if mode != "forward" else 0)
            rows += _time(Case(OP, "x".join(map(str, shape)), torch.float32, mode, steps, traffic, params.numel()),
                          device)
            if progress is not None:
                progress.update(1)
    # one model and one optimizer, its posterior switched before each step: the two providers differ
    # in nothing else (two model instances differ in where their weights sit in memory, which moved
    # a step's time by about 1% here)
    x = torch.rand(4, 3, 64, 64, generator=gen).to(device)
    vae = _autoencoder(diffusers, device)
    step = _training_step(vae, x)
    steps = {"eager": lambda: (use_pyvae_posterior(vae, False), step()),
             "pyvae": lambda: (use_pyvae_posterior(vae, True), step())}
    rows += _time(Case(OP, "AutoencoderKL step 4x3x64x64", torch.float32, "step", steps, 0, x.numel()), device)
    if progress is not None:
        progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return 2 * len(shapes(full)) + 1
