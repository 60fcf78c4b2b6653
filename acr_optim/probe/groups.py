"""Group a model's parameters by type or by layer, from module types and names only (no forward pass).

Built-in groupings, for Hugging Face models (GPT-2, BERT, T5, Marian/BART, ResNet, ConvNeXt, ...)
and plain ``nn.Module``s (torchvision-style CNNs included) alike, with the component names of the
paper's Figure 4 (Emb, Conv, BN/LN, Attn, FC):

- ``"type"``: ``embedding`` (``nn.Embedding`` and subclasses, classes named ``*Embedding*``, and
  the stem of a CNN: the model's first convolution when no ``nn.ModuleList``/``nn.Sequential``
  holds it, such as torchvision's ``conv1`` or the ``embedder`` convolution of a ``transformers``
  ResNet), ``norm`` (batch/layer/group/instance/RMS norms, classes named ``*Norm*``; the stem's
  BatchNorm too), ``convolution`` (every other ``nn.ConvNd``/``nn.ConvTransposeNd``, shortcut
  projections included), ``attention`` (linear maps inside a module path naming attention:
  ``attn``, ``attention``, ``SelfAttention``, ``EncDecAttention``, ...), ``feed_forward`` (the
  paper's FC: every other linear map, including the GPT-2 ``Conv1D``, which is a linear map with
  transposed weight, and output heads such as a CNN's classifier), ``other`` (parameters owned
  directly by other modules, e.g. a ``cls_token``).  Biases go with their module.
- ``"layer"``: the entry of the first ``nn.ModuleList``/``nn.Sequential`` on the parameter's
  path (``h.3``, ``encoder.layer.0``, ``decoder.layers.1``, ``encoder.block.2``, the ResNet stage
  ``encoder.stages.1``), with the Hugging Face ``base_model_prefix`` stripped; sibling lists of
  blocks are one layer each (torchvision's stages ``layer1`` ... ``layer4``), and a list around a
  single layer with parameters (``classifier = Sequential(Flatten, Linear)``) is one layer named
  after the list.  Parameters outside any such list are grouped by their first path component
  (``wte``, ``embeddings``, ``embedder``, ``conv1``, ``classifier``, ``fc``, ...).  In
  ``named_parameters()`` order, a CNN's layers run from the stem (lower) to the head (upper).
- ``"all"``: one group holding every selected parameter.

User groupings: a ``Mapping[str, str]`` from parameter name to group, a sequence of
``(regex, group)`` pairs (``re.search`` on the name, first match wins) or a callable
``name -> group | None``.  Parameters a user grouping leaves unmatched (or maps to ``None``)
are not probed.  Group order is the order in which the groups first appear in
``model.named_parameters()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

__all__ = ["GroupBy", "group_parameters", "parameter_type"]

GroupBy = str | Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str | None]

BUILTIN = ("type", "layer", "all")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_CONV_TYPES = (nn.modules.conv._ConvNd,)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def parameter_type(module: nn.Module, path: str) -> str:
    """Type group of the parameters owned by ``module`` found at dotted ``path`` in the model (a CNN's stem, which
    only the whole model can tell, is left to :func:`group_parameters`)."""
    cls = type(module).__name__
    if isinstance(module, nn.Embedding) or "Embedding" in cls:
        return "embedding"
    if isinstance(module, _NORM_TYPES) or "Norm" in cls:
        return "norm"
    if isinstance(module, _CONV_TYPES):
        return "convolution"
    # transformers.pytorch_utils.Conv1D (GPT-2) is a linear map, matched by name to avoid importing transformers.
    if isinstance(module, (nn.Linear, nn.Bilinear)) or cls == "Conv1D" or isinstance(module, nn.MultiheadAttention):
        in_attention = isinstance(module, nn.MultiheadAttention) or _ATTENTION.search(path)
        return "attention" if in_attention else "feed_forward"
    return "other"


def _owners(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Parameter name -> (owner module path, owner module), for ``named_parameters`` (shared weights once)."""
    owner_of: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owner_of.setdefault(id(p), (path, module))
    return {name: owner_of[id(p)] for name, p in model.named_parameters()}


def _is_list(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.ModuleList`` or ``nn.Sequential``."""
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _has_children(module: nn.Module) -> bool:
    """Whether ``module`` has submodules."""
    return next(module.children(), None) is not None


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList/Sequential whose every entry has submodules (blocks, not single layers)."""
    return _is_list(module) and len(module) > 0 and all(_has_children(entry) for entry in module)


def _wraps_one_layer(module: nn.Module) -> bool:
    """A ModuleList/Sequential whose only entry with parameters is a single layer (``Sequential(Flatten, Linear)``)."""
    holders = [entry for entry in module if next(entry.parameters(), None) is not None]
    return len(holders) == 1 and not _has_children(holders[0])


def _stem(model: nn.Module) -> str | None:
    """Path of the model's first convolution if no ModuleList/Sequential holds it (a CNN's stem), else ``None``."""
    path = next((path for path, module in model.named_modules() if isinstance(module, _CONV_TYPES)), None)
    if not path:  # no convolution, or the model is one
        return None
    module = model
    for part in path.split("."):
        if _is_list(module):
            return None
        module = getattr(module, part)
    return path


def _layer_of(model: nn.Module, name: str) -> str:
    """The ``"layer"`` group of parameter ``name`` (see the module docstring)."""
    parts = name.split(".")
    prefix = getattr(model, "base_model_prefix", "")
    strip = 1 if prefix and parts[0] == prefix and len(parts) > 2 else 0
    module = model
    for i, part in enumerate(parts[:-1]):
        child = getattr(module, part)
        if _is_list(module) and part.isdigit():
            end = i if i > strip and _wraps_one_layer(module) else i + 1
            return ".".join(parts[strip:end])
        if _is_block_list(child) and sum(_is_block_list(sibling) for sibling in module.children()) > 1:
            return ".".join(parts[strip : i + 1])
        module = child
    return parts[strip] if len(parts) - strip > 1 else parts[-1]


def _builtin(model: nn.Module, by: str) -> Callable[[str], str]:
    if by == "all":
        return lambda name: "all"
    if by == "layer":
        return lambda name: _layer_of(model, name)
    owners, stem = _owners(model), _stem(model)
    return lambda name: "embedding" if owners[name][0] == stem else parameter_type(owners[name][1], owners[name][0])


def _user(by: GroupBy) -> Callable[[str], str | None]:
    if callable(by):
        return by
    if isinstance(by, Mapping):
        return by.get
    pairs = list(by)
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise TypeError("by as a sequence must hold (regex, group) pairs")
    compiled = [(re.compile(pattern), group) for pattern, group in pairs]

    def match(name: str) -> str | None:
        return next((group for pattern, group in compiled if pattern.search(name)), None)

    return match


def group_parameters(
    model: nn.Module, by: GroupBy = "type", names: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Map group name -> parameter names (``model.named_parameters()`` order) for the grouping ``by``.

    ``names`` restricts the result to those parameters (default: all trainable parameters).
    Every selected parameter lands in exactly one group under a built-in grouping.
    """
    if isinstance(by, str):
        if by not in BUILTIN:
            raise ValueError(f"by must be one of {BUILTIN}, a mapping, (regex, group) pairs or a callable, got {by!r}")
        key = _builtin(model, by)
    else:
        key = _user(by)
    if names is None:
        selected = [name for name, p in model.named_parameters() if p.requires_grad]
    else:
        wanted = set(names)
        selected = [name for name, _ in model.named_parameters() if name in wanted]
    groups: dict[str, list[str]] = {}
    for name in selected:
        group = key(name)
        if group is not None:
            groups.setdefault(str(group), []).append(name)
    return groups
