"""The one convention for generated sections of a markdown page (docs/results.md, benchmarks/README.md).

A generated section sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``; a generator rewrites the
bodies of the sections it makes and nothing else, and a test checks that the committed page is what the
records give.  Also the two common ways a table prints a statistic, and the tables' names of the tasks' models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lab.stats import mean_std as _mean_std

MODEL = {"de_en": "Marian", "lm": "GPT-2"}  # how the tables name the model of a task
SECTION = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that open and close the generated section ``name``."""
    return f"<!-- table:{name} -->", "<!-- /table -->"


def block(name: str, body: str) -> str:
    """The section ``name`` with ``body``, markers included (as a generator prints it)."""
    begin, end = markers(name)
    return f"{begin}\n{body}\n{end}"


def sections(text: str) -> dict[str, str]:
    """Every generated section of a markdown text, by name (bodies without the final newline)."""
    return {m["name"]: m["body"].removesuffix("\n") for m in SECTION.finditer(text)}


def fill(text: str, generated: Mapping[str, str]) -> str:
    """``text`` with the body of every section named in ``generated`` replaced; a name without its section on
    the page is an error (the page lost its markers), a section of the page not in ``generated`` is left alone."""
    missing = set(generated) - set(sections(text))
    if missing:
        raise KeyError(f"no generated section {sorted(missing)} on the page: add its markers {markers('NAME')}")

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        return f"{match[1]}{generated[name]}\n{match[4]}" if name in generated else match[0]

    return SECTION.sub(body, text)


def mean_std(values: Iterable[float], fmt: str) -> str:
    """``mean ± std`` over seeds in format ``fmt`` (the mean alone for one value)."""
    values = list(values)
    mean, std = _mean_std(values)
    return format(mean, fmt) if len(values) < 2 else f"{format(mean, fmt)} ± {format(std, fmt)}"


def interval(mean: float, half: float, fmt: str) -> str:
    """A signed difference and the half-width of its interval, ``+0.123 ± 0.045``, in format ``fmt``."""
    return f"{format(mean, '+' + fmt)} ± {format(half, fmt)}"
