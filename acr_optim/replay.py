"""The one rule for the random numbers of ACR's corrupted pass: it replays the clean pass's.

ACR's step minimises ``(1 - alpha) L(w) + alpha L(w + a)``.  With dropout (or any random op in the
forward) each pass draws noise ``xi``; the corrupted pass runs every micro-batch of the step again,
at ``w + a``, from the random-number state its clean pass started from, so it draws the same
``xi``: the objective is ``(1 - alpha) L(w; xi) + alpha L(w + a; xi)`` with one noise draw per
micro-batch, and the corruption is the only difference between the two passes.  After the replay
the generators continue from where the clean pass left them, so a run's random stream (later masks,
batch order) is the base optimizer's.  ``ACR.step(closure)``, ``ACRCallback`` and the accelerate
recipe (``recipes/lm_no_trainer.py``) all follow it::

    state = rng_state(devices)           # before the clean forward of a micro-batch
    ...clean forward/backward...
    with optimizer.perturbed():
        with replaying(state):           # the same dropout masks, at w + a
            ...corrupted forward/backward...

The state covers the CPU generator and those of the accelerator devices named (CUDA, XPU, MPS...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RNGState", "replaying", "rng_state", "set_rng_state"]


@dataclass(frozen=True)
class RNGState:
    """The CPU generator's state and, for each accelerator device named, that device's generator's state."""

    cpu: Tensor
    devices: tuple[tuple[torch.device, Tensor], ...] = ()


def _indexed(device: torch.device | str) -> torch.device:
    """``device`` with its index: a bare ``cuda`` is the current device, as torch's own RNG functions take it."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None:
        return device
    return torch.device(device.type, torch.get_device_module(device.type).current_device())


def rng_state(devices: Iterable[torch.device | str] = ()) -> RNGState:
    """The current state of the CPU generator and of the default generator of each non-CPU device in ``devices``."""
    accelerators = sorted({_indexed(d) for d in devices if torch.device(d).type != "cpu"}, key=str)
    return RNGState(
        torch.get_rng_state(),
        tuple((d, torch.get_device_module(d.type).get_rng_state(d.index)) for d in accelerators),
    )


def set_rng_state(state: RNGState) -> None:
    """Put every generator of ``state`` back to it."""
    torch.set_rng_state(state.cpu)
    for device, value in state.devices:
        torch.get_device_module(device.type).set_rng_state(value, device.index)


@contextmanager
def replaying(state: RNGState) -> Iterator[None]:
    """Run the block from ``state``; on exit (also on error) the generators are where they were on entry."""
    after = rng_state(device for device, _ in state.devices)
    set_rng_state(state)
    try:
        yield
    finally:
        set_rng_state(after)
