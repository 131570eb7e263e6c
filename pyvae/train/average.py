"""The weight average of ``pyvae train --weight-ema``: an exponential moving average of the model's
parameters, updated after every optimizer step, that the evaluation, the held-out losses and the
pictures use in place of the last weights (Polyak averaging, as VDVAE and NVAE evaluate).

The decay ramps up, ``min(decay, (1 + t) / (10 + t))`` after t updates, so that the average of a
short run is not dominated by its initial weights. Buffers are not averaged: a model evaluated with
the average uses its live buffers (a VQ-VAE's EMA codebook, the KL schedule's step).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightAverage:
    """The averaged parameters of ``model`` (in the order of ``model.parameters()``) with ``decay``."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.params = [p.detach().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Moves the average towards the model's current parameters."""
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` with the averaged parameters in place of its own for the ``with`` block (then its
        own again, even on an exception)."""
        own = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            torch._foreach_copy_(list(model.parameters()), self.params)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(model.parameters()), own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        """ValueError unless ``state`` (from :meth:`state_dict`) has this model's parameter shapes."""
        params = state["params"]
        if len(params) != len(self.params) or any(a.shape != b.shape for a, b in zip(params, self.params)):
            raise ValueError("its weight average does not match this model's parameters")
        with torch.no_grad():
            torch._foreach_copy_(self.params, [p.to(self.params[0].device) for p in params])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


def maybe_applied(average: "WeightAverage | None", model: torch.nn.Module):
    """``average.applied(model)``, or a no-op context without an average."""
    return contextlib.nullcontext(model) if average is None else average.applied(model)
