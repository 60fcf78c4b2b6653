"""Loading Hugging Face models for probing and training: the task from the config, checks that no weight is
left newly initialised, and the fixes the corruption maths depends on."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import check_local_path
from ..errors import UsageError
from ..probe.merged import fixed_parameter_names

TASKS = ("causal-lm", "seq2seq", "classification")
_AUTO_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "classification": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
}


def task_of_config(config: Any) -> str | None:
    """The task (one of ``TASKS``) of the head a config was saved with (``config.architectures``), else
    ``"seq2seq"`` for an encoder-decoder config, else ``None``."""
    from transformers.models.auto import modeling_auto

    for architecture in getattr(config, "architectures", None) or []:
        for task, (_, mapping) in _AUTO_CLASSES.items():
            if architecture in getattr(modeling_auto, mapping).values():
                return task
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else None


def _hub_error(name: str, what: str, err: OSError) -> UsageError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UsageError(f"{what} {name}: {first}")


def load_model(name: str, task: str | None = None, *, what: str = "--model", **kwargs: Any) -> tuple[nn.Module, str]:
    """``(model, task)``: the pretrained model ``name`` with the head of ``task`` (default: the config's).

    Raises :class:`~acr_optim.errors.UsageError` naming ``what`` when a path-like ``name`` does not
    exist, the hub cannot serve it, the config does not tell the task, ``task`` contradicts the
    config, or loading leaves any weight newly initialised (a head the checkpoint does not have).
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``revision``, ``trust_remote_code``).
    """
    import transformers

    check_local_path(name, what)
    common = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    try:
        config = transformers.AutoConfig.from_pretrained(name, **common)
    except OSError as err:
        raise _hub_error(name, what, err) from None
    saved = task_of_config(config)
    architecture = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
    if task is None and saved is None:
        raise UsageError(f"{what} {name}: cannot tell its task from the config ({architecture}); pass --task")
    if task is not None and saved is not None and task != saved:
        raise UsageError(f"--task {task} contradicts {what} {name}, a {saved} model ({architecture})")
    task = task or saved
    auto = getattr(transformers, _AUTO_CLASSES[task][0])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the missing-weights report becomes our one-line error below
    try:
        model, info = auto.from_pretrained(name, config=config, output_loading_info=True, **kwargs)
    except OSError as err:
        raise _hub_error(name, what, err) from None
    except ValueError as err:  # an architecture without this head
        raise UsageError(f"{what} {name} ({architecture}) cannot be loaded for --task {task}: {err}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UsageError(
            f"{what} {name}: loading it as {task} leaves {len(missing)} weight(s) newly initialised "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): wrong --task, or an incomplete checkpoint"
        )
    refreeze_fixed_parameters(model)  # e.g. Marian's sinusoidal positions come back trainable
    return model, task


def load_tokenizer(name: str, what: str = "--tokenizer", **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(name)`` with a pad token (the EOS token if it has none); errors as
    :func:`load_model`'s."""
    from transformers import AutoTokenizer

    check_local_path(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as err:
        raise _hub_error(name, what, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refreeze_fixed_parameters(model: nn.Module) -> list[str]:
    """Turn ``requires_grad`` off again for parameters the model's class builds frozen; return their names.

    ``from_pretrained`` in transformers 5 returns some fixed tables as trainable (Marian's sinusoidal
    ``embed_positions``); ACR and the probes corrupt every trainable parameter, so they would
    corrupt (and train) those tables.  The class's own layout comes from a copy built from the
    config on the meta device (no memory, no weights).
    """
    frozen = fixed_parameter_names(model)
    fixed = [name for name, p in model.named_parameters() if name in frozen and p.requires_grad]
    for name, p in model.named_parameters():
        if name in fixed:
            p.requires_grad_(False)
    return fixed
