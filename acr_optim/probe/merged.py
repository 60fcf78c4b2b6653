r"""Probing the weights a ``peft`` LoRA model deploys, without merging: its merged weights stand in its base weights.

The deployed model is the merged one.  Adding ``a`` to the base weight ``W`` of an
adapted layer adds ``a`` to its merged weight, and the gradient of the loss with respect to ``W``
is its gradient with respect to ``W'``.  So the unmerged model, corrupted in its base weights,
behaves as the merged model corrupted in its weights: :func:`merged_parameters` names those base
weights as the merged model names its own, and::

    weights = merged_parameters(peft_model)
    table = probe(peft_model.get_base_model(), batches, eps=..., params=weights.values())

gives the table of ``probe(peft_model.merge_and_unload(), batches, eps=..., params=weights)`` (the
same groups and deltas, to float rounding), without merging.  ``get_base_model()`` is the
transformers model with the adapters in place: the built-in groupings see the layout, and the
``base_model_prefix``, of the merged model.  Only additive adapters qualify: LoRA without DoRA
(which rescales ``W + s B A`` by a learned magnitude over its norm).

:func:`fixed_parameter_names` names what a model class builds frozen (Marian's sinusoidal positions),
which the probes leave out by default.  This module belongs to the probe layer: the integrations
import it, never the other way round.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["fixed_parameter_names", "is_peft_model", "merged_parameters", "probe_target"]


def fixed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters ``type(model)`` builds frozen (Marian's sinusoidal ``embed_positions``), from
    a copy built from the config on the meta device (no memory, no weights); empty, with a warning, for
    classes that cannot be built that way."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as err:  # meta-unfriendly classes
        warnings.warn(
            f"could not check {type(model).__name__} for fixed parameters made trainable: {err}", stacklevel=3
        )
        return set()
    return {name for name, p in fresh.named_parameters() if not p.requires_grad}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing ``peft``: such a model means it is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name in model.merge_and_unload(): the parameter of model that stands for that merged weight}``.

    For an adapted layer the stand-in is its base weight ``W`` (``W + a`` merges to ``W' + a``); a
    module of ``modules_to_save`` stands for itself through its trained copy; every other parameter
    of the base model is its own merged self.  Adapter parameters are left out.  Names are those of
    ``model.get_base_model()`` with the adapter wrapping removed.

    Raises ``TypeError`` unless ``model`` is a ``peft.PeftModel``, and ``NotImplementedError`` for
    adapters whose merge is not ``W + s B A`` (anything but LoRA, or LoRA with DoRA).
    """
    if not is_peft_model(model):
        raise TypeError(f"model must be a peft.PeftModel, got {type(model).__name__}")
    from peft import PeftType
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    config = model.active_peft_config
    if config.peft_type != PeftType.LORA or config.use_dora:
        kind = "LoRA with DoRA" if config.peft_type == PeftType.LORA else str(config.peft_type)
        raise NotImplementedError(
            f"merged_parameters needs adapters that merge additively (W + s B A, LoRA without DoRA), got {kind}"
        )
    inner = model.get_base_model()
    left_out: set[int] = set()
    renamed: dict[int, str] = {}
    for path, module in inner.named_modules():
        if isinstance(module, BaseTunerLayer):
            kept = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            kept = module.modules_to_save[module.active_adapters[0]]
        else:
            continue
        # the adapters (and a wrapped module's original and inactive copies) are not weights of the merged model
        left_out |= {id(p) for p in module.parameters()}
        for name, p in kept.named_parameters():
            left_out.discard(id(p))
            renamed[id(p)] = f"{path}.{name}"
    return {renamed.get(id(p), name): p for name, p in inner.named_parameters() if id(p) not in left_out}


def probe_target(
    model: nn.Module, params: Iterable[str | nn.Parameter] | None
) -> tuple[nn.Module, Iterable[str | nn.Parameter] | None]:
    """What the probes measure for ``model``: itself and ``params``, or for a LoRA ``peft.PeftModel`` its
    merged weights without merging (see the module docstring): ``get_base_model()`` and the base weights
    of :func:`merged_parameters`.  Default ``params`` of a LoRA model: every merged weight but those its
    class keeps fixed (Marian's sinusoidal positions); names in ``params`` are merged-model names.
    Tables then name parameters as ``get_base_model()`` does (``....base_layer.weight`` in adapted layers).
    """
    if not is_peft_model(model):
        return model, params
    params = None if params is None else list(params)  # read twice below: a generator would be empty the second time
    weights = merged_parameters(model)
    base = model.get_base_model()
    if params is None:
        fixed = fixed_parameter_names(base)
        return base, [p for name, p in weights.items() if name not in fixed]
    unknown = [p for p in params if isinstance(p, str) and p not in weights]
    if unknown:
        raise ValueError(f"params must name weights of the merged model; {unknown[0]!r} is not one")
    return base, [weights[p] if isinstance(p, str) else p for p in params]
