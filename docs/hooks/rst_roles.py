"""Griffe extension: the docstrings' reStructuredText roles (``:func:`~acr_optim.gradient_corruption```) become
Markdown cross-references (``[gradient_corruption][acr_optim.gradient_corruption]``) that autorefs links, and that
a strict build checks.

A target is looked up as written, then as a member of the documented object and of each of its parents, as Python
resolves a name inside a class or module; an attribute without a docstring (which the reference does not render)
stays plain code.  A qualified ``acr_optim...`` target that is not found stays a reference,
so the strict build fails on it; any other unknown target (``torch.optim.Optimizer``) stays plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`"
)


class RstRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None:
            return

        def reference(match: re.Match[str]) -> str:
            target = match["target"]
            text = target.rsplit(".", 1)[-1] if match["tilde"] else target
            found = _resolve(obj, target, loader)
            if found is None:
                return f"[`{text}`][{target}]" if target.startswith("acr_optim.") else f"`{text}`"
            return f"[`{text}`][{found}]" if found else f"`{text}`"

        obj.docstring.value = ROLE.sub(reference, obj.docstring.value)


def _resolve(obj: griffe.Object, target: str, loader: griffe.GriffeLoader) -> str | None:
    """The path of ``target``, named in ``obj``'s docstring; ``""`` for an object the reference does not render (an
    attribute without a docstring); None when there is no such object."""
    scopes, scope = [""], obj
    while scope is not None:
        scopes.insert(0, scope.path + ".")
        scope = scope.parent
    for prefix in scopes:
        try:
            found = loader.modules_collection[prefix + target]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        rendered = found.docstring is not None or found.kind in (griffe.Kind.MODULE, griffe.Kind.CLASS)
        return found.path if rendered else ""
    return None
