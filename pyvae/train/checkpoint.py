"""Checkpoints of ``pyvae train``: ``<out>/checkpoint.pt`` after every epoch, written atomically
(:func:`atomic_write`: a killed run leaves the previous checkpoint intact), holding everything the
next step reads (the model with its unsaved buffers, the optimizer, the random generators, the
history), so that a resumed run equals the uninterrupted one; loading one refuses (UsageError) a file
that is missing, damaged, of another format or written with other options."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
from typing import Any, Callable, Optional

import torch

from .. import __version__
from .average import WeightAverage
from .distributed import Run
from .errors import UsageError
from .options import plain_args, show_value

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 3  # 2: adds "buffers", the model's buffers that its state_dict leaves out; 3: "average"
# Options that may change when a run is resumed; every other one must match the checkpoint's.
RESUMABLE_CHANGES = ("epochs", "out", "device", "backend", "compile", "threads", "quiet", "resume", "overwrite",
                     "iwae_k", "debug_rank_state", "debug_stop_at_step")
# What a checkpoint holds; a file without one of these cannot be resumed.
CHECKPOINT_KEYS = ("format", "model", "buffers", "optimizer", "epoch", "step", "rng", "args", "history", "average")


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


def save_checkpoint(args: argparse.Namespace, run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, step: int, history: dict, average: Optional[WeightAverage] = None) -> None:
    """Writes ``<out>/checkpoint.pt``: the state after ``epoch`` epochs and ``step`` steps. Its
    ``"model"`` holds the last weights (what training continues from); with ``--weight-ema``,
    ``"average"`` holds the averaged parameters, the weights the run was evaluated with, in the order
    of ``model.parameters()`` (:meth:`WeightAverage.state_dict`); None without."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "buffers": unsaved_buffers(model),
             "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "rng": rng_state(run.device),
             "args": compatible_args(args), "history": history, "pyvae_version": __version__,
             "average": None if average is None else average.state_dict()}
    atomic_write(os.path.join(run.out, CHECKPOINT), lambda f: torch.save(state, f))


def compatible_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options a resumed run must share with its checkpoint's, as the checkpoint stores them."""
    return plain_args(args, leave_out=RESUMABLE_CHANGES)


def resume_state(args: argparse.Namespace, device: torch.device) -> Optional[dict]:
    """With ``--resume`` the checkpoint to resume from (:func:`load_checkpoint`), else None;
    UsageError when ``--out`` holds a checkpoint and neither ``--resume`` nor ``--overwrite`` is given."""
    if args.resume:
        return load_checkpoint(args, device)
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(checkpoint) and not args.overwrite:
        raise UsageError(f"{checkpoint} exists: pass --resume to continue that run, --overwrite to start "
                         "afresh, or choose another --out")
    return None


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
    saved, now = state["args"], compatible_args(args)
    diffs = [f"--{k.replace('_', '-')} {show_value(saved.get(k))} (now {show_value(v)})"
             for k, v in now.items() if saved.get(k) != v]
    if diffs:
        raise UsageError(f"--resume: {path} was written with different options: {'; '.join(diffs)} "
                         "(resume with the checkpoint's options, or choose another --out)")
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: Run,
            average: Optional[WeightAverage] = None) -> tuple[int, int, dict]:
    """Puts a checkpoint's state (see :func:`load_checkpoint`) into the model, the optimizer, the
    weight average and the random generators; returns (epoch, step, history). UsageError if it does
    not fit them."""
    try:
        model.load_state_dict(state["model"])
        load_unsaved_buffers(model, state["buffers"])
        optimizer.load_state_dict(state["optimizer"])
        if (average is None) != (state["average"] is None):
            raise ValueError("it was written with another --weight-ema")
        if average is not None:
            average.load_state_dict(state["average"])
        set_rng_state(state["rng"], run.device)
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


def rng_state(device: torch.device) -> dict:
    """The random generators' state: PyTorch's, and the device's on a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_rank_state(run: Run, model: torch.nn.Module, average: Optional[WeightAverage] = None) -> None:
    """``<out>/rank_state/rank<r>.json``: a hash of each entry of the model's state_dict (and, as
    ``"average"``, of the weight average), for the test that checks that the ranks end with the same
    model (``--debug-rank-state``)."""
    hashes = {k: _digest([v]) for k, v in model.state_dict().items()}
    if average is not None:
        hashes["average"] = _digest(average.params)
    os.makedirs(os.path.join(run.out, "rank_state"), exist_ok=True)
    atomic_write(os.path.join(run.out, "rank_state", f"rank{run.rank}.json"),
                 lambda f: f.write(json.dumps(hashes).encode()))
