"""Module buffers put back as they were: the corrupted pass must not move BatchNorm's running statistics.

A corrupted forward in training mode updates every buffer a module keeps in place (BatchNorm's
``running_mean``, ``running_var`` and ``num_batches_tracked``, and any custom running estimate),
now at the corrupted weights ``w + a``.  ACR's objective has no such second update: the step
must leave every buffer as the clean pass left it.  :class:`BufferSnapshot` records each buffer
the first time a forward reaches its module (through a global forward pre-hook, so it needs no
reference to the model and sees DDP, ``torch.compile`` and PEFT wrappers alike) and writes the
recorded values back, bit for bit, on :meth:`~BufferSnapshot.restore`.  The SAM implementations
users know get the same effect by setting BatchNorm's momentum to 0 for the second pass, which
covers BatchNorm only and still counts ``num_batches_tracked``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ["BufferSnapshot", "preserved_buffers"]


class BufferSnapshot:
    """Record the buffers of every module a forward reaches from now on; :meth:`restore` puts them back.

    Costs one copy of those buffers (BatchNorm: two vectors and a counter per layer) and, per
    forward call of a module, one set look-up.  A buffer that a forward replaces by a new tensor
    (``self.running_mean = ...``) gets its original tensor back, holding its original values.
    """

    def __init__(self) -> None:
        self._seen: set[nn.Module] = set()
        self._saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        self._handle = register_module_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: object) -> None:
        # Inside a graph dynamo traces, recording would break the graph at every module: the eager call of
        # the compiled wrapper (``torch.compile(model)``) has recorded the whole subtree already.
        if torch.compiler.is_compiling() or module in self._seen:
            return
        # The whole subtree at once: a compiled or fused forward updates a submodule's buffers without
        # calling the submodule's hooks.
        for sub in module.modules():
            if sub in self._seen:
                continue
            self._seen.add(sub)
            self._saved += [(sub, name, b, b.clone()) for name, b in sub._buffers.items() if b is not None]

    @torch.no_grad()
    def restore(self) -> None:
        """Stop recording and write every recorded buffer back as it was when first reached."""
        self._handle.remove()
        for module, name, buffer, value in self._saved:
            module._buffers[name] = buffer
            buffer.copy_(value)
        self._seen.clear()
        self._saved.clear()


@contextmanager
def preserved_buffers() -> Iterator[None]:
    """``with preserved_buffers(): model(x)``: every buffer the forwards inside reach is as before on exit."""
    snapshot = BufferSnapshot()
    try:
        yield
    finally:
        snapshot.restore()
