"""The pictures of ``pyvae train`` (rank 0, matplotlib): samples.png, reconstructions.png,
loss_curves.png, and the model's picture of its latent: latent_traversal.png for a continuous latent,
code_usage.png for a codebook. What to draw comes from the model (``prior_samples``,
``latent_traversal``, ``conditional``, ``fixed_kl``) and from metrics.json."""
from __future__ import annotations

import argparse
import math
import os

import torch

from .. import models
from ..data import ImageDataset
from .distributed import Run


def _grid(images: torch.Tensor, ncols: int):
    """[N, C, H, W] in [0, 1] -> one mosaic array (H', W') or (H', W', 3) with 1-pixel gaps."""
    import numpy as np

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    if c >= 3:
        images = images[:, :3]  # RGB (an alpha channel is not shown)
    else:
        images = images[:, :1]  # grayscale (a second channel is not shown)
    nrows = math.ceil(n / ncols)
    channels = images.shape[1]
    canvas = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, channels), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = \
            images[i].permute(1, 2, 0).numpy()
    return canvas[..., 0] if channels == 1 else canvas


def _show_grid(ax, mosaic, title: str) -> None:
    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


@torch.no_grad()
def write_pictures(args: argparse.Namespace, run: Run, data: ImageDataset, model: models.BaseVAE, history: dict,
                   metrics: dict, written: list[str]) -> None:
    """samples.png, reconstructions.png, loss_curves.png and latent_traversal.png (a continuous
    latent) or code_usage.png (a codebook) in ``run.out``; appends each file's name to ``written``
    once it is saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    device = run.device

    def save(fig, name: str) -> None:
        fig.savefig(os.path.join(run.out, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    samples = model.prior_samples(8, generator=torch.Generator(device=device).manual_seed(args.seed))
    fig, ax = plt.subplots(figsize=(5, 5 * math.ceil(len(samples.images) / samples.ncols) / samples.ncols + 0.4))
    _show_grid(ax, _grid(samples.images, samples.ncols), samples.title)
    save(fig, "samples.png")

    n = min(32, len(data.x_test))
    x = data.x_test[:n].to(device)
    y = data.y_test[:n].to(device) if model.conditional else None
    recon = model.reconstruct(x, y)
    rows = []
    for start in range(0, n, 8):  # alternating rows: 8 originals, then their reconstructions
        rows += [x[start:start + 8], recon[start:start + 8]]
    fig, ax = plt.subplots(figsize=(5, 0.65 * len(rows) + 0.4))
    _show_grid(ax, _grid(torch.cat([_pad(r, 8) for r in rows]), 8),
               "test images (odd rows) and their reconstructions (even rows)")
    save(fig, "reconstructions.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = history["epochs"]
    steps_per_epoch = max(1, epochs[0]["step"]) if epochs else 1
    step_loss = history["step_loss"]
    ax.plot([(i + 1) / steps_per_epoch for i in range(len(step_loss))], step_loss, lw=0.6, alpha=0.4,
            color="tab:blue", label="train loss per step")
    # an epoch's mean loss belongs to the middle of the epoch; the test value to its end
    ax.plot([e["epoch"] - 0.5 for e in epochs], [e["train_loss"] for e in epochs], color="tab:blue", marker=".",
            label="train loss, epoch mean")
    if model.fixed_kl is None:
        test, test_label = [e["test_negative_elbo"] for e in epochs], "test negative ELBO"
    else:  # the ELBO adds the constant (h*w*log K) to this, which would put it far above the rest
        test = [e["test_recon_nll"] for e in epochs]
        test_label = f"test reconstruction NLL (+ {model.fixed_kl:.1f} = negative ELBO)"
    ax.plot([e["epoch"] for e in epochs], test, color="tab:orange", marker=".", label=test_label)
    base = metrics["baseline"]["test_nll"]
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline (independent pixels) {base:.2f}")
    values = sorted(step_loss + test + [base])
    if values:
        lo, hi = values[0], values[int(0.95 * (len(values) - 1))]
        pad = 0.1 * (hi - lo) or 1.0
        ax.set_ylim(lo - pad, max(hi, base) + pad)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title(f"{args.model} on {os.path.basename(data.name)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "loss_curves.png")

    if model.continuous_latent:
        traversal = model.latent_traversal(torch.tensor(metrics["latent_variances"]))
        fig, ax = plt.subplots(figsize=(5, 0.6 * len(traversal.images) / traversal.ncols + 0.5))
        _show_grid(ax, _grid(traversal.images, traversal.ncols), traversal.title)
        save(fig, "latent_traversal.png")
    else:
        # one panel per stage of a residual quantizer
        stages = metrics.get("num_quantizers", 1) > 1
        counts = metrics["code_counts"] if stages else [metrics["code_counts"]]
        used = metrics["codes_used"] if stages else [metrics["codes_used"]]
        perplexities = metrics["perplexity"] if stages else [metrics["perplexity"]]
        fig, axes = plt.subplots(len(counts), 1, figsize=(7, 1.2 + 2.3 * len(counts)), squeeze=False)
        for q, ax in enumerate(axes[:, 0]):
            ax.bar(range(len(counts[q])), counts[q], width=1.0, color="tab:blue")
            ax.set_ylabel("uses on the test set")
            stage = f"stage {q + 1}: " if stages else ""
            ax.set_title(f"{stage}code usage: {used[q]}/{len(counts[q])} codes used, "
                         f"perplexity {perplexities[q]:.1f}", fontsize=10)
        axes[-1, 0].set_xlabel("code")
        fig.tight_layout()
        save(fig, "code_usage.png")


def _pad(images: torch.Tensor, n: int) -> torch.Tensor:
    """Pads a row of images with blank (white) ones to ``n``."""
    if len(images) == n:
        return images
    return torch.cat([images, images.new_ones(n - len(images), *images.shape[1:])])
