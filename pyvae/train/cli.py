"""``pyvae train``: train a VAE, ConvVAE, CVAE, VQ-VAE or hierarchical VAE from the command line.

A plain loop (as pytorch/examples' VAE is): Adam(W) over shuffled mini-batches with a tqdm bar,
a checkpoint after every epoch (written to a temporary file in the same directory and renamed, so
a killed run leaves the previous checkpoint intact; it holds everything the next step reads, so a
resumed run equals the uninterrupted one), then ``metrics.json`` in ``--out`` as soon as the
evaluation ends, and after it PNG pictures (optional: when they cannot be drawn, e.g. without
matplotlib, the run warns and still succeeds). Under ``torchrun --nproc_per_node=N`` the same
command trains with DistributedDataParallel: every global batch of ``--batch-size`` examples is
split between the ranks, and rank 0 writes the outputs.

Exit status: 0 on success, 2 for a usage error (bad option, missing or malformed dataset, a dataset
too small to evaluate, missing scikit-learn for the digits, an --out that cannot be written, missing,
incompatible or incomplete checkpoint: one line on stderr, no traceback, checked before training),
1 when training diverges.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import __version__, backends, models, registry
from ..data import DatasetError, ImageDataset, load_dataset, test_count
from ..metrics import evaluating, per_example

# --model NAME: the model class it trains (its attributes, not its name, say what the CLI does with it)
MODELS: dict[str, type[models.BaseVAE]] = {"vae": models.VAE, "convvae": models.ConvVAE, "cvae": models.CVAE,
                                           "vqvae": models.VQVAE, "hvae": models.HierarchicalVAE}
VAE_FAMILY = tuple(name for name, cls in MODELS.items() if cls.continuous_latent)
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: adds "buffers", the model's buffers that its state_dict leaves out
END_WAIT = datetime.timedelta(days=1)  # how long the other ranks wait for rank 0's evaluation and pictures

# The CLI's defaults per model, sized for the 8x8 digits (a default run takes seconds to a couple of
# minutes on a 2-core CPU). Options not named here take the model class's own default.
DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": dict(epochs=100, batch_size=64, lr=1e-3, latent_dim=16, hidden_dims=(256, 128)),
    "convvae": dict(epochs=100, batch_size=64, lr=1e-3, latent_dim=16, channels=(32, 64), hidden_dim=256),
    "cvae": dict(epochs=100, batch_size=64, lr=1e-3, latent_dim=16, hidden_dims=(256, 128)),
    "vqvae": dict(epochs=30, batch_size=64, lr=2e-3, num_codes=64, code_dim=16, channels=(32, 64), downsample=1,
                  ema_decay=0.99),
    "hvae": dict(epochs=100, batch_size=64, lr=1e-3, latent_dims=(16, 8, 4), hidden_dims=(256, 128),
                 kl_warmup_steps=250),
}
COMMON_DEFAULTS = dict(dataset="digits", likelihood="bernoulli", weight_decay=0.0, backend="auto", seed=0,
                       iwae_k=100)

# Options that only some models take: giving one to another model is an error, not silently ignored.
MODEL_OPTIONS = {
    "latent_dim": ("vae", "convvae", "cvae"), "kl_warmup_steps": VAE_FAMILY, "free_bits": VAE_FAMILY,
    "latent_dims": ("hvae",), "hidden_dims": ("vae", "cvae", "hvae"), "hidden_dim": ("convvae",),
    "channels": ("convvae", "vqvae"),
    "num_codes": ("vqvae",), "code_dim": ("vqvae",), "downsample": ("vqvae",), "ema_decay": ("vqvae",),
    "dead_code_threshold": ("vqvae",),
}

# Options that may change when a run is resumed; every other one must match the checkpoint's.
RESUMABLE_CHANGES = ("epochs", "out", "device", "backend", "compile", "threads", "quiet", "resume", "overwrite",
                     "iwae_k", "debug_rank_state", "debug_stop_at_step")
# What a checkpoint holds; a file without one of these cannot be resumed.
CHECKPOINT_KEYS = ("format", "model", "buffers", "optimizer", "epoch", "step", "rng", "args", "history")
TRAIN_EXTRA = 'pip install "pyvae[train]"'  # the optional dependencies of the CLI (matplotlib, scikit-learn)


class UsageError(Exception):
    """A problem with the command line or what it names (dataset, checkpoint, device): the CLI
    prints the message on one line and exits with status 2."""


class TrainingError(Exception):
    """Training failed in a way the user can act on (e.g. the loss diverged): exit status 1."""


# --------------------------------------------------------------------------------------- arguments
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
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="reconstruction likelihood. Default: bernoulli")
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
    g.add_argument("--kl-warmup-steps", type=_nonnegative_int,
                   help="steps over which beta ramps up from 0. Default: 0 (hvae: 250)")
    g.add_argument("--free-bits", type=_free_bits, help="KL floor per latent dimension in nats; for hvae one "
                   "number for every layer or a comma list, one per layer, bottom first. Default: 0")
    g = p.add_argument_group("convolutional models (convvae, vqvae)")
    g.add_argument("--channels", type=_int_tuple, help=f"conv channels per stage, e.g. 32,64 {d}")
    g = p.add_argument_group("VQ-VAE")
    g.add_argument("--num-codes", type=_positive_int, help=f"codebook size {d}")
    g.add_argument("--code-dim", type=_positive_int, help=f"code vector size {d}")
    g.add_argument("--downsample", type=_nonnegative_int, help=f"stride-2 stages before the quantizer {d}")
    g.add_argument("--ema-decay", type=_ema_decay, help=f"codebook EMA decay, or 'none' for a learned codebook {d}")
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
        f"{m}: " + ", ".join(f"{k.replace('_', '-')}={_show(v)}" for k, v in DEFAULTS[m].items()) for m in MODELS)
    return p


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses ``argv`` and fills the per-model defaults; raises UsageError for bad options."""
    args = build_parser().parse_args(argv)
    for name, takers in MODEL_OPTIONS.items():
        if getattr(args, name) is not None and args.model not in takers:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --model {args.model} "
                             f"(it is an option of {', '.join(takers)})")
    for name, value in {**COMMON_DEFAULTS, **DEFAULTS[args.model]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.free_bits, tuple) and args.model != "hvae":
        raise UsageError(f"--free-bits takes one number for --model {args.model} (a list, one per layer, is for hvae)")
    if args.gaussian_logvar is not None and args.likelihood != "gaussian":
        raise UsageError("--gaussian-logvar applies to --likelihood gaussian only")
    if args.dataset != "digits":
        args.dataset = os.path.abspath(args.dataset)  # a resumed run may start from another directory
    if args.out is None:
        args.out = os.path.join("runs", args.model)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    return args


# ------------------------------------------------------------------------------------- processes
@dataclass
class Run:
    """Where this process stands: its rank in the job, the device, the output directory, and (when
    distributed) the group in which the ranks wait for each other at the end (see :func:`_run`)."""
    rank: int
    world: int
    device: torch.device
    out: str
    end_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _device(requested: Optional[str], local_rank: int) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device cuda: CUDA is not available here ({why}); use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_processes(args: argparse.Namespace) -> Run:
    """This process's Run; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise UsageError(f"malformed torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {exc}") from None
    device = _device(args.device, local_rank if world > 1 else 0)
    if world > 1:
        if args.batch_size < world:
            raise UsageError(f"--batch-size {args.batch_size} is smaller than the number of processes ({world}): "
                             "every rank needs a share of each batch")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as exc:  # a missing MASTER_ADDR / MASTER_PORT and the like
            raise UsageError(f"WORLD_SIZE={world} but torch.distributed cannot start: {exc}") from None
        # The other ranks wait there while rank 0 evaluates and draws, however long that takes: a
        # gloo group of its own, whose timeout is not the training collectives' (NCCL's watchdog
        # would end a wait of more than 10 minutes, gloo's default 30, and the run with it).
        return Run(rank, world, device, args.out, dist.new_group(backend="gloo", timeout=END_WAIT))
    return Run(rank, world, device, args.out)


# ------------------------------------------------------------------------------------------ model
def build_model(args: argparse.Namespace, data: ImageDataset) -> torch.nn.Module:
    """The model the options describe; UsageError for sizes the model rejects."""
    kwargs: dict[str, Any] = dict(likelihood=args.likelihood, backend=args.backend)
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


def _check_backend(args: argparse.Namespace, device: torch.device) -> dict[str, str]:
    """The backend each op family resolves to here; UsageError if --backend cannot serve the device."""
    try:
        return {op: backends.resolve(args.backend, device, op) for op in registry.NAMES}
    except ValueError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None


def _call(model, x: torch.Tensor, y: Optional[torch.Tensor]):
    return model(x) if y is None else model(x, y)


# ------------------------------------------------------------------------------------ checkpoints
def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes ``path`` through a temporary file in the same directory, then renames it over
    ``path`` (atomic on POSIX): a crash or kill at any moment leaves either the old file or the
    complete new one, never a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _compatible_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())
            if k not in RESUMABLE_CHANGES}


def load_checkpoint(args: argparse.Namespace, device: torch.device) -> dict:
    """The checkpoint to resume from; UsageError if there is none or it belongs to another run."""
    path = os.path.join(args.out, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path} (train without --resume first)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise UsageError(f"--resume: checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UsageError(f"--resume: {path} is not a pyvae train checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume: {path} has checkpoint format {state['format']!r}, and this pyvae resumes "
                         f"format {CHECKPOINT_FORMAT} only (start afresh with --overwrite, or choose another --out)")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["args"], dict):
        what = f"no {', '.join(missing)}" if missing else "its args are not a dict"
        raise UsageError(f"--resume: {path} is incomplete or damaged ({what}), so it cannot be resumed "
                         "(start afresh with --overwrite, or choose another --out)")
    saved, now = state["args"], _compatible_args(args)
    diffs = [f"--{k.replace('_', '-')} {_show_arg(saved.get(k))} (now {_show_arg(v)})"
             for k, v in now.items() if saved.get(k) != v]
    if diffs:
        raise UsageError(f"--resume: {path} was written with different options: {'; '.join(diffs)} "
                         "(resume with the checkpoint's options, or choose another --out)")
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: Run) -> tuple[int, int, dict]:
    """Puts a checkpoint's state (see :func:`load_checkpoint`) into the model, the optimizer and the
    random generators; returns (epoch, step, history). UsageError if it does not fit them."""
    try:
        model.load_state_dict(state["model"])
        load_unsaved_buffers(model, state["buffers"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], run.device)
        history = state["history"]
        if not {"step_loss", "epochs", "train_seconds"} <= set(history):
            raise ValueError("its history lacks step_loss, epochs or train_seconds")
        return int(state["epoch"]), int(state["step"]), history
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())  # load_state_dict's message spans lines
        raise UsageError(f"--resume: {os.path.join(run.out, CHECKPOINT)} does not fit this model and its "
                         f"options ({type(exc).__name__}: {detail})") from None


def unsaved_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers that its state_dict leaves out (non-persistent ones), by name.

    The next training step may read them: a VectorQuantizer's step counter salts the rows its
    dead-code restarts pick. Layers keep them out of state_dict on purpose (a drop-in layer keeps
    its original's keys), so checkpoints save them beside it, for any model alike."""
    in_state_dict = model.state_dict().keys()
    return {name: b for name, b in model.named_buffers() if name not in in_state_dict}


def load_unsaved_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copies what :func:`unsaved_buffers` saved back into the model's buffers; ValueError or
    RuntimeError when the names or shapes differ."""
    own = unsaved_buffers(model)
    if set(buffers) != set(own):
        raise ValueError(f"its unsaved buffers {sorted(buffers)} are not this model's {sorted(own)}")
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


def _show_arg(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ----------------------------------------------------------------------------------------- loop
def batches(n: int, batch_size: int, epoch: int, seed: int, world: int) -> list[torch.Tensor]:
    """The global batches of one epoch: a permutation of ``range(n)`` seeded by (seed, epoch), the
    same on every rank, cut into ``batch_size`` pieces; a last piece smaller than ``world`` (one
    example per rank) is dropped. Rank r trains on ``batch.tensor_split(world)[r]``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    out = list(order.split(batch_size))
    if out and len(out[-1]) < world:
        out.pop()
    return out


def heldout_losses(model: models.BaseVAE, data: ImageDataset, run: Run) -> dict[str, float]:
    """Mean test negative ELBO (and, for a model whose ELBO holds a fixed KL, e.g. a VQ-VAE's
    h*w*log K, the reconstruction NLL); each rank evaluates its share of the test set."""
    x, y = data.x_test.to(run.device), data.y_test.to(run.device) if model.conditional else None
    share = slice(run.rank, None, run.world)
    x, y = x[share], None if y is None else y[share]
    with evaluating(model):
        sums = [per_example(model.negative_elbo, x, y).double().sum()]
        if model.fixed_kl is not None:
            sums.append(per_example(lambda xb, yb: model(xb, yb).recon_loss, x, y).double().sum())
    sums = torch.stack(sums + [torch.tensor(float(len(x)), dtype=torch.float64, device=run.device)])
    if run.distributed:
        dist.all_reduce(sums)
    sums = (sums[:-1] / sums[-1]).tolist()
    return dict(zip(("test_negative_elbo", "test_recon_nll"), sums))


def train(args: argparse.Namespace, run: Run, data: ImageDataset, model: torch.nn.Module, state: Optional[dict],
          log: Callable[[str], None]) -> dict:
    """Trains up to ``args.epochs``; a checkpoint after every epoch. Returns the final history."""
    from tqdm import tqdm

    # weight decay (AdamW) on the layers' weight matrices and kernels only: not on biases, a learned
    # likelihood variance or a learned codebook
    decay = [p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() > 1]
    chosen = set(map(id, decay))
    rest = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr) if args.weight_decay else torch.optim.Adam(groups, lr=args.lr)
    history: dict[str, Any] = {"step_loss": [], "epochs": [], "train_seconds": 0.0}
    epoch = step = 0
    if state is not None:
        epoch, step, history = restore(state, model, optimizer, run)

    train_model = model
    if run.distributed:
        # The ranks' buffers (EMA codebooks, schedules) are kept equal by the layers themselves (the
        # quantizer all-reduces its statistics); not broadcasting them before every forward saves
        # that traffic and lets the multi-process test check that they stay equal.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None, forward_sync_buffers=False)
    if args.compile:
        train_model = torch.compile(train_model)

    x_all = data.x_train.to(run.device)
    y_all = data.y_train.to(run.device) if model.conditional else None
    model.train()
    while epoch < args.epochs:
        epoch_start = time.perf_counter()
        plan = batches(len(x_all), args.batch_size, epoch, args.seed, run.world)
        losses = []
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                   disable=args.quiet or not run.main, file=sys.stderr)
        for i, global_batch in enumerate(bar):
            # contiguous shards: the ranks' rows in rank order are the global batch, the order in
            # which the quantizer's dead-code restarts number the rows of all ranks
            shard = global_batch.tensor_split(run.world)[run.rank].to(run.device)
            x = x_all[shard]
            out = _call(train_model, x, None if y_all is None else y_all[shard])
            loss = out.loss
            if run.distributed:
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
                # batch makes that the gradient of the mean over the whole global batch.
                loss = loss * (len(shard) * run.world / len(global_batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach() / run.world)
            step += 1
            if step == args.debug_stop_at_step:
                os.kill(os.getpid(), signal.SIGSTOP)  # the resume test SIGKILLs the process here
            if i % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(losses[-1]) * run.world:.3f}")
        bar.close()
        step_loss = torch.stack(losses).double() if losses else torch.zeros(0, dtype=torch.float64)
        if run.distributed:
            dist.all_reduce(step_loss)
        step_loss = step_loss.tolist()
        train_seconds = time.perf_counter() - epoch_start
        test = heldout_losses(model, data, run)
        epoch += 1
        if not all(math.isfinite(v) for v in [*step_loss, *test.values()]):
            last = step_loss[-1] if step_loss else "-"
            raise TrainingError(f"training diverged in epoch {epoch} (train loss {last}, test "
                                f"{test['test_negative_elbo']}); the last good checkpoint is kept. Try a smaller --lr")
        history["step_loss"] += step_loss
        history["epochs"].append({"epoch": epoch, "step": step, "train_loss": sum(step_loss) / max(len(step_loss), 1),
                                  **test, "seconds": train_seconds})
        history["train_seconds"] += train_seconds
        if run.main:
            save_checkpoint(os.path.join(run.out, CHECKPOINT), {
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "buffers": unsaved_buffers(model),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "rng": _rng_state(run.device), "args": _compatible_args(args),
                "history": history, "pyvae_version": __version__})
            if not args.quiet:
                recon = f"  test recon NLL {test['test_recon_nll']:.3f}" if "test_recon_nll" in test else ""
                log(f"epoch {epoch}/{args.epochs}  train loss {history['epochs'][-1]['train_loss']:.3f}  "
                    f"test negative ELBO {test['test_negative_elbo']:.3f}{recon} nats  ({train_seconds:.1f} s)")
    history["steps"] = step
    return history


# --------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def baseline_nll(data: ImageDataset, likelihood: str) -> tuple[torch.Tensor, dict]:
    """Test NLL per example ``[N_test]`` of the best model that ignores the latent: independent
    pixels, each with the likelihood's distribution fitted to the training set by maximum likelihood
    (Bernoulli and continuous Bernoulli: on counts smoothed by half an observation, which keeps the
    probabilities off 0 and 1; Gaussian: with a variance floor)."""
    from .. import ops

    x, t = data.x_train.double(), data.x_test
    n = x.shape[0]
    mean = (x.sum(0) + 0.5) / (n + 1)
    if likelihood == "gaussian":
        # A pixel that never varies in training would get variance 0 (an infinite density); the
        # floor is the variance of a uniform quantisation step of 1/255 (8-bit images).
        var = x.var(0, correction=0).clamp_min(1 / 255 ** 2 / 12)
        mean = x.mean(0)
        nll = ops.gaussian_nll(mean.float().expand_as(t), t, var.log().float().expand_as(t), reduction="per_sample")
        return nll, {"distribution": "gaussian", "fit": "per-pixel mean and variance of the training set "
                     "(variance floor 1/(12*255^2))"}
    if likelihood == "bernoulli":
        logits = (mean.log() - (-mean).log1p()).float()
        nll = ops.bernoulli_nll(logits.expand_as(t), t, reduction="per_sample")
        return nll, {"distribution": "bernoulli",
                     "fit": "p = per-pixel mean of the training set, (sum + 0.5) / (N + 1)"}
    # continuous Bernoulli: an exponential family in its logit, so maximum likelihood matches its
    # mean to the data mean; the mean is increasing in the logit, found by bisection.
    from ..models.base import continuous_bernoulli_mean

    lo, hi = torch.full_like(mean, -1e4), torch.full_like(mean, 1e4)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = continuous_bernoulli_mean(mid) < mean
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    logits = ((lo + hi) / 2).float()
    nll = ops.continuous_bernoulli_nll(logits.expand_as(t), t, reduction="per_sample")
    return nll, {"distribution": "continuous_bernoulli", "fit": "per-pixel maximum likelihood on the training set "
                 "(mean matched to (sum + 0.5) / (N + 1))"}


@torch.no_grad()
def evaluate(args: argparse.Namespace, run: Run, data: ImageDataset, model: models.BaseVAE) -> dict:
    """The test-set numbers of metrics.json (rank 0): the model's own (its ``evaluation_metrics``),
    with the baseline that ignores the latent after its test negative ELBO."""
    torch.manual_seed(args.seed)  # training is over: this only makes the metrics repeatable
    x = data.x_test.to(run.device)
    y = data.y_test.to(run.device) if model.conditional else None
    own = model.evaluation_metrics(x, y, x_train=data.x_train.to(run.device), iwae_k=args.iwae_k, seed=args.seed)
    base, base_info = baseline_nll(data, args.likelihood)
    model_nll, base_nll = own["test_negative_elbo"], float(base.double().mean())
    return {
        "test_negative_elbo": model_nll,
        "baseline": {**base_info, "test_nll": base_nll},
        # > 0: the model's negative ELBO is that fraction of |baseline| below the baseline's NLL
        "relative_improvement": (base_nll - model_nll) / abs(base_nll) if base_nll else None,
        **own,
    }


def write_metrics(path: str, metrics: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))


# -------------------------------------------------------------------------------------- pictures
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
def write_pictures(args: argparse.Namespace, run: Run, data: ImageDataset, model, history: dict,
                   metrics: dict, written: list[str]) -> None:
    """samples.png, reconstructions.png, loss_curves.png and latent_traversal.png (VAE family) or
    code_usage.png (vqvae) in ``run.out``; appends each file's name to ``written`` once it is saved."""
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
        counts = metrics["code_counts"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(counts)), counts, width=1.0, color="tab:blue")
        ax.set_xlabel("code")
        ax.set_ylabel("uses on the test set")
        ax.set_title(f"code usage: {metrics['codes_used']}/{len(counts)} codes used, "
                     f"perplexity {metrics['perplexity']:.1f}", fontsize=10)
        save(fig, "code_usage.png")


def _pad(images: torch.Tensor, n: int) -> torch.Tensor:
    """Pads a row of images with blank (white) ones to ``n``."""
    if len(images) == n:
        return images
    return torch.cat([images, images.new_ones(n - len(images), *images.shape[1:])])


# ------------------------------------------------------------------------------------------ main
def _rank_state(model) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def run_training(args: argparse.Namespace, log: Callable[[str], None] = print) -> Optional[dict]:
    """Everything ``pyvae train`` does, for parsed options; returns the metrics (rank 0) or None."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    run = None
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        run = start_processes(args)
        return _run(args, run, started, log)
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on (tests, notebooks)
        if run is not None and run.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, run: Run, started: float, log: Callable[[str], None]) -> Optional[dict]:
    resolved = _check_backend(args, run.device)
    try:
        data = load_dataset(args.dataset, binarize=args.binarize)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    check_dataset_size(args, run, data)
    torch.manual_seed(args.seed)
    model = build_model(args, data).to(run.device)
    checkpoint = os.path.join(args.out, CHECKPOINT)
    state = load_checkpoint(args, run.device) if args.resume else None
    if state is None and os.path.exists(checkpoint) and not args.overwrite:
        raise UsageError(f"{checkpoint} exists: pass --resume to continue that run, --overwrite to start "
                         "afresh, or choose another --out")
    if run.main:
        prepare_out(args.out)
    if run.distributed:
        dist.barrier()  # the directory exists before any rank writes into it
    history = train(args, run, data, model, state, log)
    if args.debug_rank_state:
        os.makedirs(os.path.join(args.out, "rank_state"), exist_ok=True)
        atomic_write(os.path.join(args.out, "rank_state", f"rank{run.rank}.json"),
                     lambda f: f.write(json.dumps(_rank_state(model)).encode()))
    metrics = report(args, run, data, model, history, resolved, started) if run.main else None
    if run.distributed:
        # The ranks leave together, after rank 0's evaluation and pictures. A rank that went straight
        # from its last collective to the interpreter's exit was now and then aborted there
        # ("terminate called without an active exception", and torchrun then stopped rank 0 too):
        # the process group outlives destroy_process_group, and a gloo worker thread that had not yet
        # released that collective's tensors needed the GIL during finalization. Waiting here, with
        # the GIL released, gives it that time.
        dist.barrier(group=run.end_group)
    return metrics


def check_dataset_size(args: argparse.Namespace, run: Run, data: ImageDataset) -> None:
    """Refuses up front (UsageError) a dataset too small to train on or to evaluate."""
    if len(data.x_train) < run.world:
        raise UsageError(f"dataset {data.name}: its training split has {len(data.x_train)} image(s), fewer than "
                         f"the {run.world} processes, and every process needs at least one")
    if MODELS[args.model].continuous_latent and len(data.x_test) < 2:
        smallest = next(n for n in itertools.count(2) if test_count(n) >= 2)
        raise UsageError(f"dataset {data.name}: its test split has {len(data.x_test)} image, and the evaluation of "
                         f"--model {args.model} needs at least 2 (active units are a variance over the test images): "
                         f"give it at least {smallest} images")


def prepare_out(out: str) -> None:
    """Creates ``out`` and writes (and removes) a file in it, so that a directory the run could not
    write into is refused (UsageError) before training rather than at the first checkpoint."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    # A real file rather than os.access: it is what the run will do, and sees what os.access does
    # not (ACLs, network filesystems' own checks).
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyvae-write-test-", dir=out)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write into the directory ({exc.strerror})") from None
    os.close(fd)
    os.remove(probe)


def report(args: argparse.Namespace, run: Run, data: ImageDataset, model, history: dict, resolved: dict,
           started: float) -> dict:
    """Evaluates the model and writes metrics.json, then the pictures (rank 0); returns the metrics.

    metrics.json is written as soon as the evaluation ends, so that the run's result is on disk
    whatever happens to the pictures; it is written again with their names. Pictures are optional:
    when they cannot be drawn, a warning says why and the run still succeeds."""
    train_seconds = history["train_seconds"]
    metrics = {
        "model": args.model, "dataset": data.name, "input_shape": list(data.input_shape),
        "n_train": len(data.x_train), "n_test": len(data.x_test),
        "parameters": sum(p.numel() for p in model.parameters()),
        **evaluate(args, run, data, model),
        "epochs": len(history["epochs"]), "steps": history["steps"], "train_seconds": train_seconds,
        "steps_per_second": history["steps"] / train_seconds if train_seconds else None,
        "pictures": [],
        "wall_seconds": time.perf_counter() - started,  # this invocation, evaluation and pictures included
        "device": str(run.device), "world_size": run.world, "backend": args.backend, "backends": resolved,
        "compile": args.compile, "torch_version": torch.__version__, "pyvae_version": __version__,
        "python_version": platform.python_version(),
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())},
    }
    path = os.path.join(args.out, "metrics.json")
    write_metrics(path, metrics)
    try:
        write_pictures(args, run, data, model, history, metrics, metrics["pictures"])
    except Exception as exc:  # noqa: BLE001 - any failure of an optional extra costs only the pictures
        if isinstance(exc, ImportError):
            why = f"{exc.name or 'matplotlib'} is not installed: {TRAIN_EXTRA}"
        else:
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())}; they need matplotlib ({TRAIN_EXTRA})"
        metrics["pictures_skipped"] = f"no pictures ({why})"
        print(f"pyvae train: warning: {metrics['pictures_skipped']}; metrics.json and {CHECKPOINT} are complete",
              file=sys.stderr)
    metrics["wall_seconds"] = time.perf_counter() - started
    write_metrics(path, metrics)
    return metrics


def _summary(m: dict) -> str:
    change = m["relative_improvement"]
    line = (f"test negative ELBO {m['test_negative_elbo']:.3f} nats, {100 * abs(change):.1f}% "
            f"{'below' if change >= 0 else 'above'} the independent-pixel baseline's {m['baseline']['test_nll']:.3f}")
    if "active_units" in m:
        line += f"; iwae_nll {m[next(k for k in m if k.startswith('iwae_nll'))]:.3f}; " \
                f"active units {m['active_units']}/{m['latent_dim']}"
    else:
        line += f" (reconstruction NLL {m['test_recon_nll']:.3f}); codes used {m['codes_used']}/{m['num_codes']}, " \
                f"perplexity {m['perplexity']:.1f}"
    return line + f"; {m['steps']} steps in {m['train_seconds']:.1f} s ({m['steps_per_second']:.1f}/s)"


def main(argv: Optional[list[str]] = None) -> int:
    """``pyvae train ...``; returns the exit status (2 for usage errors, 1 if training diverged)."""
    from tqdm import tqdm

    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        metrics = run_training(args, log=tqdm.write)
    except UsageError as exc:
        print(f"pyvae train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"pyvae train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyvae train: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    if metrics is not None:
        print(f"wrote {args.out}: {', '.join(['metrics.json', *metrics['pictures'], CHECKPOINT])}")
        print(_summary(metrics))
    return 0
