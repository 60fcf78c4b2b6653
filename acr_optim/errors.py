"""The error command-line tools report as one line: input from the user that cannot be used."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UsageError", "exit_on_usage_error"]


class UsageError(ValueError):
    """A path, file, flag or model given by the user that cannot be used (missing, empty, contradictory)."""


def exit_on_usage_error(prog: str, main: Callable[[], Any]) -> Any:
    """Run ``main()``; on :class:`UsageError` print ``"{prog}: error: {message}"`` to stderr and exit with status 2.

    Bugs keep their traceback; only errors in the user's input are shortened to one line.
    """
    try:
        return main()
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
