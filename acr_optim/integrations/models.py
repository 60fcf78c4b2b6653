"""Loading fixes for Hugging Face models that the corruption maths depends on."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def refreeze_fixed_parameters(model: nn.Module) -> list[str]:
    """Turn ``requires_grad`` off again for parameters the model's class builds frozen; return their names.

    ``from_pretrained`` in transformers 5 returns some fixed tables as trainable (Marian's sinusoidal
    ``embed_positions``); ACR and the probes corrupt every trainable parameter, so they would
    corrupt (and train) those tables.  The class's own layout comes from a copy built from the
    config on the meta device (no memory, no weights).
    """
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as err:  # meta-unfriendly classes
        warnings.warn(
            f"could not check {type(model).__name__} for fixed parameters made trainable: {err}", stacklevel=2
        )
        return []
    frozen = {name for name, p in fresh.named_parameters() if not p.requires_grad}
    fixed = [name for name, p in model.named_parameters() if name in frozen and p.requires_grad]
    for name, p in model.named_parameters():
        if name in fixed:
            p.requires_grad_(False)
    return fixed
