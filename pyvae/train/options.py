"""The options of ``pyvae train``: the parser (its errors raise :class:`UsageError`), the per-model
defaults and the options each model takes, :func:`parse_args`, and :func:`build_model`, the model the
options describe. The ``--model`` names and the tables below are the one place where the trainer
knows a model by its name; what a model does it says itself (see :mod:`pyvae.models`)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

from .. import backends, models
from ..data import ImageDataset
from .errors import UsageError

# --model NAME: the model class it trains (its attributes, not its name, say what the CLI does with it)
MODELS: dict[str, type[models.BaseVAE]] = {"vae": models.VAE, "convvae": models.ConvVAE, "cvae": models.CVAE,
                                           "vqvae": models.VQVAE, "hvae": models.HierarchicalVAE}
VAE_FAMILY = tuple(name for name, cls in MODELS.items() if cls.continuous_latent)
LIKELIHOODS = ("dmol", "bernoulli", "continuous_bernoulli", "gaussian")

# The CLI's defaults per model, sized for the 8x8 digits (a default run takes seconds to a couple of
# minutes on a 2-core CPU). Options not named here take the model class's own default. The MLP
# models' ELU activations, width of latent, learning rate and weight average were chosen on a
# validation split of the digits' training images (bench/results/cpu/train/README.md).
DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": dict(epochs=100, batch_size=64, lr=2e-3, latent_dim=32, hidden_dims=(256, 128), activation="elu",
                weight_ema=0.995),
    "convvae": dict(epochs=100, batch_size=64, lr=1e-3, latent_dim=16, channels=(32, 64), hidden_dim=256,
                    weight_ema=0.0),
    "cvae": dict(epochs=100, batch_size=64, lr=2e-3, latent_dim=32, hidden_dims=(256, 128), activation="elu",
                 weight_ema=0.995),
    "vqvae": dict(epochs=30, batch_size=64, lr=2e-3, num_codes=64, code_dim=16, channels=(32, 64), downsample=1,
                  ema_decay=0.99, weight_ema=0.0),
    "hvae": dict(epochs=100, batch_size=64, lr=2e-3, latent_dims=(16, 8, 4), hidden_dims=(256, 128),
                 kl_warmup_steps=1000, activation="elu", weight_ema=0.995),
}
COMMON_DEFAULTS = dict(dataset="digits", weight_decay=0.0, backend="auto", seed=0, iwae_k=100)
# --likelihood dmol: mixture components per pixel unless --num-mix says otherwise (on the digits'
# validation split 10 suited the vae and 5 the hvae: bench/results/cpu/train/defaults.md)
DMOL_NUM_MIX = {"vae": 10, "convvae": 10, "cvae": 10, "vqvae": 10, "hvae": 5}

# Options that only some models take: giving one to another model is an error, not silently ignored.
MODEL_OPTIONS = {
    "latent_dim": ("vae", "convvae", "cvae"), "kl_warmup_steps": VAE_FAMILY, "free_bits": VAE_FAMILY,
    "latent_dims": ("hvae",), "hidden_dims": ("vae", "cvae", "hvae"), "hidden_dim": ("convvae",),
    "activation": ("vae", "cvae", "hvae"),
    "channels": ("convvae", "vqvae"),
    "num_codes": ("vqvae",), "code_dim": ("vqvae",), "downsample": ("vqvae",), "ema_decay": ("vqvae",),
    "dead_code_threshold": ("vqvae",), "quantizer": ("vqvae",), "levels": ("vqvae",),
    "num_quantizers": ("vqvae",),
}

# --quantizer fsq: the vqvae options it has no use for, and its default levels
FSQ_EXCLUDES = ("num_codes", "code_dim", "ema_decay", "dead_code_threshold", "num_quantizers")
FSQ_LEVELS = (8, 5, 5, 5)

# Options that take a comma list, one value per layer, for these models (one number for the others).
PER_LAYER_OPTIONS = {"free_bits": ("hvae",)}


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors raise UsageError (one line, printed by main) instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _free_bits(text: str):
    """One number, or a comma list of numbers (one per layer of a hierarchical VAE)."""
    values = text.split(",")
    try:
        floats = tuple(_nonnegative_float(v.strip()) for v in values)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, or a comma list of them (one per layer, "
                                         f"hvae), got {text!r}") from None
    return floats[0] if len(floats) == 1 else floats


def _number(cast, accept: Callable[[float], bool], expected: str):
    """An argparse type: ``cast(text)`` if ``accept`` takes it (a finite value), else one message."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _decay(text: str) -> float:
    value = _nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _ema_decay(text: str):
    if text.lower() == "none":
        return "none"  # not None, which stands for "not given" until the defaults are filled in
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), or 'none' for a learned codebook, got {text!r}")
    return value


def _gaussian_logvar(text: str):
    if text in ("learned", "optimal"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'learned', 'optimal' or a number (a fixed log-variance), "
                                         f"got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvae train", description="Train a VAE, ConvVAE, CVAE, VQ-VAE or hierarchical VAE on the "
                "bundled digits or your own image array; writes checkpoint.pt, metrics.json and PNG pictures to "
                "--out. Under `torchrun --nproc_per_node=N` it trains with DistributedDataParallel.")
    d = "(default: per model, see below)"
    p.add_argument("--model", required=True, choices=MODELS, help="which model to train")
    p.add_argument("--dataset", default=None, help="'digits' (scikit-learn's 1797 8x8 digits, no download) or an "
                   ".npz/.npy file of images [N,H,W], [N,C,H,W] or [N,H,W,C], uint8 or float in [0,1]; an .npz "
                   "may hold labels as 'y' or 'labels' (needed by cvae). Default: digits")
    p.add_argument("--binarize", action="store_true", help="pixels >= 0.5 become 1, the rest 0")
    p.add_argument("--epochs", type=_positive_int, help=f"total epochs (a resumed run continues up to this) {d}")
    p.add_argument("--batch-size", type=_positive_int, help=f"global mini-batch size (split between ranks) {d}")
    p.add_argument("--lr", type=_positive_float, help=f"learning rate of Adam(W) {d}")
    p.add_argument("--weight-decay", type=_nonnegative_float, help="AdamW weight decay. Default: 0 (plain Adam)")
    p.add_argument("--weight-ema", type=_decay, help="evaluate with an exponential moving average of the weights of "
                   f"this decay, updated every step (0 = the last weights) {d}")
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="reconstruction likelihood: dmol is a discretized "
                   "mixture of logistics on the data's levels. Default: dmol for data on a grid of more than 2 levels "
                   "(the digits' 17, uint8 images' 256), bernoulli otherwise (binary, --binarize or continuous data)")
    p.add_argument("--num-mix", type=_positive_int, help=f"with --likelihood dmol: mixture components per pixel. "
                   "Default: " + ", ".join(f"{m} {n}" for m, n in DMOL_NUM_MIX.items()))
    p.add_argument("--gaussian-logvar", type=_gaussian_logvar,
                   help="with --likelihood gaussian: 'learned' (per channel), 'optimal' or a fixed log-variance")
    p.add_argument("--beta", type=_nonnegative_float,
                   help="KL weight (VAE family, default 1) or commitment weight (vqvae, default 0.25)")
    g = p.add_argument_group("VAE family (vae, convvae, cvae, hvae)")
    g.add_argument("--latent-dim", type=_positive_int, help=f"latent dimensions (vae, convvae, cvae) {d}")
    g.add_argument("--latent-dims", type=_int_tuple, help=f"latent dimensions per stochastic layer, bottom first, "
                   f"at least 2 (hvae) {d}")
    g.add_argument("--hidden-dims", type=_int_tuple, help=f"MLP widths, e.g. 256,128 (vae, cvae, hvae) {d}")
    g.add_argument("--hidden-dim", type=_positive_int, help=f"width of the dense layer (convvae) {d}")
    g.add_argument("--activation", choices=("relu", "elu", "gelu", "silu"), help=f"of the MLPs (vae, cvae, hvae) {d}")
    g.add_argument("--kl-warmup-steps", type=_nonnegative_int,
                   help="steps over which beta ramps up from 0. Default: 0 (hvae: 1000)")
    g.add_argument("--free-bits", type=_free_bits, help="KL floor per latent dimension in nats; for hvae one "
                   "number for every layer or a comma list, one per layer, bottom first. Default: 0")
    g = p.add_argument_group("convolutional models (convvae, vqvae)")
    g.add_argument("--channels", type=_int_tuple, help=f"conv channels per stage, e.g. 32,64 {d}")
    g = p.add_argument_group("VQ-VAE")
    g.add_argument("--num-codes", type=_positive_int, help=f"codebook size {d}")
    g.add_argument("--code-dim", type=_positive_int, help=f"code vector size {d}")
    g.add_argument("--downsample", type=_nonnegative_int, help=f"stride-2 stages before the quantizer {d}")
    g.add_argument("--ema-decay", type=_ema_decay, help=f"codebook EMA decay, or 'none' for a learned codebook {d}")
    g.add_argument("--quantizer", choices=("vq", "fsq"), help="vq: a codebook; fsq: finite scalar quantization, "
                   "each latent channel bounded and rounded to --levels (no codebook, no VQ loss). Default: vq")
    g.add_argument("--levels", type=_int_tuple, help="with --quantizer fsq: levels per latent channel (their product "
                   "is the number of codes). Default: 8,5,5,5")
    g.add_argument("--num-quantizers", type=_positive_int, help="residual VQ: codebooks in sequence, each "
                   "quantizing what the ones before it left (all in one fused call). Default: 1")
    g.add_argument("--dead-code-threshold", type=_nonnegative_float,
                   help="restart codes whose EMA count falls below this (0 = off). Default: 1 with an EMA codebook, "
                   "else 0")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output directory. Default: runs/<model>")
    g.add_argument("--device", choices=("cpu", "cuda"), help="Default: cuda if available, else cpu")
    g.add_argument("--backend", choices=("auto", *backends.BACKENDS), help="pyvae op backend. Default: auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--threads", type=_positive_int, help="CPU threads per process (torch.set_num_threads). Default: "
                   "torch's (small models on a busy machine often run faster with 1)")
    g.add_argument("--seed", type=_nonnegative_int, help="random seed (model init, batch order, noise). Default: 0")
    g.add_argument("--iwae-k", type=_positive_int, help="importance samples for iwae_nll in metrics.json. Default: 100")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <out> holds a checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    # Each rank writes hashes of its final state to <out>/rank_state/ (the multi-process test reads them).
    g.add_argument("--debug-rank-state", action="store_true", help=argparse.SUPPRESS)
    # After N training steps the process stops itself (SIGSTOP), mid-epoch at a known point, so that
    # the resume test can SIGKILL it there without guessing at timing.
    g.add_argument("--debug-stop-at-step", type=_positive_int, help=argparse.SUPPRESS)
    p.epilog = "defaults per model: " + "; ".join(
        f"{m}: " + ", ".join(f"{k.replace('_', '-')}={show_value(v)}" for k, v in DEFAULTS[m].items()) for m in MODELS)
    return p


def show_value(value) -> str:
    """An option's value as the command line writes it (a sequence as a comma list)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def plain_args(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options by name, sorted, as JSON values (tuples as lists), but those in ``leave_out``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items()) if k not in leave_out}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses ``argv`` and fills the per-model defaults; raises UsageError for bad options."""
    args = build_parser().parse_args(argv)
    for name, takers in MODEL_OPTIONS.items():
        if getattr(args, name) is not None and args.model not in takers:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --model {args.model} "
                             f"(it is an option of {', '.join(takers)})")
    if args.quantizer == "fsq":
        given = [f"--{n.replace('_', '-')}" for n in FSQ_EXCLUDES if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: not options of --quantizer fsq (its codes are the combinations "
                             "of --levels)")
    for name, value in {**COMMON_DEFAULTS, **DEFAULTS[args.model]}.items():
        if getattr(args, name) is None and not (args.quantizer == "fsq" and name in FSQ_EXCLUDES):
            setattr(args, name, value)
    if args.levels is not None and args.quantizer != "fsq":
        raise UsageError("--levels applies to --quantizer fsq only")
    if args.quantizer == "fsq" and args.levels is None:
        args.levels = FSQ_LEVELS
    for name, takers in PER_LAYER_OPTIONS.items():
        if isinstance(getattr(args, name), tuple) and args.model not in takers:
            raise UsageError(f"--{name.replace('_', '-')} takes one number for --model {args.model} (a list, one per "
                             f"layer, is for {', '.join(takers)})")
    if args.gaussian_logvar is not None and args.likelihood != "gaussian":
        raise UsageError("--gaussian-logvar applies to --likelihood gaussian only")
    if args.dataset != "digits":
        args.dataset = os.path.abspath(args.dataset)  # a resumed run may start from another directory
    if args.out is None:
        args.out = os.path.join("runs", args.model)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    return args


def choose_likelihood(args: argparse.Namespace, data: ImageDataset) -> None:
    """Fills in ``args.likelihood`` from the data when it was not given (``dmol`` for data on a grid
    of more than 2 levels, ``bernoulli`` otherwise) and ``args.num_mix``; UsageError for a
    discretized likelihood of continuous data, or --num-mix without it."""
    if args.likelihood is None:
        args.likelihood = "dmol" if data.num_levels is not None and data.num_levels > 2 else "bernoulli"
    if args.likelihood != "dmol":
        if args.num_mix is not None:
            raise UsageError(f"--num-mix applies to --likelihood dmol only (this run's likelihood is "
                             f"{args.likelihood})")
        return
    if data.num_levels is None:
        raise UsageError(f"--likelihood dmol needs pixel values on a grid of levels k/(L-1) (uint8 or bool images, "
                         f"the digits, floats on the 8- or 16-bit grid); dataset {data.name} holds other values")
    if args.num_mix is None:
        args.num_mix = DMOL_NUM_MIX[args.model]


def build_model(args: argparse.Namespace, data: ImageDataset) -> models.BaseVAE:
    """The model the options describe (the likelihood chosen first: :func:`choose_likelihood`);
    UsageError for sizes the model rejects."""
    choose_likelihood(args, data)
    kwargs: dict[str, Any] = dict(likelihood=args.likelihood, backend=args.backend)
    if args.likelihood == "dmol":
        kwargs.update(num_mix=args.num_mix, num_levels=data.num_levels)
    for name in ("beta", "gaussian_logvar", *MODEL_OPTIONS):
        value = getattr(args, name)
        if value is not None and args.model in MODEL_OPTIONS.get(name, MODELS):
            kwargs[name] = None if value == "none" else value
    shape = data.input_shape
    cls = MODELS[args.model]
    if cls.conditional:
        if not data.has_labels:
            raise UsageError(f"--model {args.model} needs class labels, and dataset {data.name} has none "
                             "(store them in the .npz as 'y' or 'labels')")
        kwargs["num_classes"] = data.num_classes
    try:
        return cls(shape, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--model {args.model} on images of shape {list(shape)}: {exc}") from None
