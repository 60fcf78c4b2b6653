"""Every number README.md quotes from a table of docs/results.md or benchmarks/README.md is that table's entry.

``QUOTES`` lists them: the README text (whitespace-insensitive), with each checked number in braces, and a function
that reads the numbers from the tables, in the same order. A quoted number matches when it is the table's value at the
README's precision: within half a unit of its last decimal, or of its last non-zero digit for a round integer
("280", "13,500"). A change to a table that a README sentence quotes fails here until the sentence follows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results.md"
BENCHMARKS = REPO / "benchmarks" / "README.md"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")
Row = dict[str, str]


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def table(page: Path, anchor: str, index: int = 0) -> list[Row]:
    """The ``index``-th markdown table after ``anchor`` on ``page``, as rows of ``{header: cell}``."""
    text = page.read_text()
    assert anchor in text, f"{page.name}: no {anchor!r}"
    found: list[list[str]] = []
    block: list[str] = []
    for line in text[text.index(anchor) :].splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            found.append(block)
            block = []
            if len(found) > index:
                break
    assert len(found) > index, f"{page.name}: fewer than {index + 1} tables after {anchor!r}"
    header = _cells(found[index][0])
    return [dict(zip(header, _cells(line))) for line in found[index][2:]]


def _cells(line: str) -> list[str]:
    return [entry.strip() for entry in line.strip().strip("|").split("|")]


def cell(page: Path, anchor: str, row: str | tuple[str, ...], column: str, index: int = 0) -> str:
    """The entry of ``column`` in the row whose first cells are ``row``."""
    key = (row,) if isinstance(row, str) else row
    rows = [r for r in table(page, anchor, index) if tuple(list(r.values())[: len(key)]) == key]
    assert len(rows) == 1, f"{page.name} after {anchor!r}: {len(rows)} rows {key}"
    return rows[0][column]


def num(page: Path, anchor: str, row: str | tuple[str, ...], column: str, k: int = 0, index: int = 0) -> float:
    """The ``k``-th number of an entry."""
    return numbers(cell(page, anchor, row, column, index))[k]


def after(page: Path, anchor: str, pattern: str) -> list[float]:
    """The numbers of the first match of ``pattern`` after ``anchor`` (generated text beside a table)."""
    text = page.read_text()
    match = re.compile(pattern).search(text, text.index(anchor))
    assert match, f"{page.name}: no {pattern!r} after {anchor!r}"
    return [float(g) for g in match.groups()]


def lower(value: float, base: float) -> float:
    """How many % ``value`` is below ``base``."""
    return 100 * (1 - value / base)


# -- the tables --------------------------------------------------------------------------------------------------------

FAULTS = "<!-- table:real_faults -->"
FAULT_COLUMN = {m: f"{m} - AdamW: ΔL / perplexity" for m in ("ACR", "ACR p=inf", "SAM")}
LSTM, GPT2, MARIAN = (f"<!-- table:converged-{f} -->" for f in ("lstm", "gpt2", "marian"))
LSTM_RUNS = "<!-- table:converged-lstm-runs -->"
ACR = {family: f"acr (eps {eps}, p 2, alpha 0.5)" for family, eps in (("lstm", 3), ("gpt2", 0.1), ("marian", 0.1))}
SAM_MARIAN = "sam (eps 0.1, p 2, alpha 1)"
PAIRED = {m: f"{m} - AdamW (paired, 95% CI, signs)" for m in ("ppl", "BLEU", "ΔL eps 1")}
WELCH = {m: f"{m} - AdamW (unpaired, Welch 95% CI)" for m in ("ppl", "BLEU", "ΔL eps 1")}
OVERHEAD = {
    "fp32": "### GPT-2 from `GPT2Config`",
    "bf16": "### Same model, bf16 autocast forward",
    "mlp": "### MLP (4.21M parameters",
}
FRONTIER = {"lm": "### lm: 685,568 parameters", "de_en": "### de_en: 984,064 parameters"}
DOMINATE = r"dominate (\d+) of the (\d+) peer settings, (\d+) without"
RESOLVED = r"(\d+) of the (\d+) pairs on both axes"


def corruption_ratios() -> list[float]:
    """Finding 1's ratios ΔL gradient / random at eps <= 3, both models, both n."""
    ratios = []
    for task in ("de_en", "lm"):
        for index in (0, 1):
            for row in table(RESULTS, f"<!-- table:corruption-{task} -->", index):
                if float(row["eps"]) <= 3 and numbers(row["ΔL gradient / random"]):
                    ratios.append(numbers(row["ΔL gradient / random"])[0])
    return [min(ratios), max(ratios)]


def norm_first_cells() -> list[float]:
    """Finding 2, converged Marian: the run x eps cells where norm is the most fragile type, all the cells, how many of
    the first are in the GPU run of seed 0, and that run's ΔL of norm and of the embedding at eps 1."""
    rows = table(RESULTS, "**marian, rank of norm among the types in each run**")
    summary = next(r["run"] for r in rows if r["run"].startswith("norm most fragile"))
    gpu0 = next(r for r in rows if r["run"] == "seed 0, H200")
    firsts = sum(v.startswith("1 (") for k, v in gpu0.items() if k != "run")
    return [*numbers(summary)[:2], firsts, *numbers(gpu0["eps 1"])[1:]]


def gpt2_runs_third() -> list[float]:
    """The converged GPT-2 runs in which norm ranks 3rd at every eps."""
    rows = table(RESULTS, "**gpt2, rank of norm among the types in each run**")[:-1]
    return [sum(all(v.startswith("3 (") for k, v in r.items() if k != "run") for r in rows)]


def frontier_column(task: str, column: str) -> list[float]:
    values = [numbers(r[column])[0] for r in table(BENCHMARKS, FRONTIER[task])]
    return [min(values), max(values)]


def holm_counts() -> list[float]:
    """Finding 4: the number of paired ΔL comparisons, twice (the README names it twice), once Holm keeps none."""
    compared, kept = after(RESULTS, FAULTS, r"Over the (\d+) ΔL comparisons.*?keeps (\d+)")
    assert kept == 0, f"Holm keeps {kept} of finding 4's comparisons; the README says none"
    return [compared, compared]


def prune_range() -> list[float]:
    cells = [
        -num(RESULTS, FAULTS, f"`prune:{s}`", column, k=2, index=1)
        for s in ("0.5", "0.7", "0.9")
        for column in FAULT_COLUMN.values()
    ]
    return [min(cells), max(cells)]


QUOTES: list[tuple[str, Callable[[], Sequence[float]]]] = [
    # Real-world faults
    (
        "the worst-flip search {1.8}-{2.8} s",
        lambda: [
            min(float(r["s"]) for r in table(BENCHMARKS, "## `faults.py`") if r["spec"].startswith("`flip-worst")),
            max(float(r["s"]) for r in table(BENCHMARKS, "## `faults.py`") if r["spec"].startswith("`flip-worst")),
        ],
    ),
    ("lower the loss increase by {18}-{46} % at 50-90 % sparsity", prune_range),
    (
        "the L-inf variant's {-28} % is within the noise, {-0.0235} ± {0.0372})",
        lambda: [num(RESULTS, FAULTS, "`prune:0.5`", FAULT_COLUMN["ACR p=inf"], k, index=1) for k in (2, 0, 1)],
    ),
    (
        "SAM's {29} % and {31} % lower increases",
        lambda: [
            -num(RESULTS, FAULTS, row, FAULT_COLUMN["SAM"], k=2, index=1)
            for row in ("`flip:1e-3:int8`", "`flip-worst:10:mantissa`")
        ],
    ),
    ("are 2 of {42} comparisons, and none of the {42} survives a Holm correction", holm_counts),
    # Performance
    (
        "two-pass floor ({0.996} x in fp32, {1.015} x with a bf16 forward)",
        lambda: [num(BENCHMARKS, OVERHEAD[d], "acr p=2 a=0.5 n=all", "/floor") for d in ("fp32", "bf16")],
    ),
    (
        "at the SAM setting ({0.986} x and {0.991} x)",
        lambda: [num(BENCHMARKS, OVERHEAD[d], "acr p=2 a=1 n=all", "/peer") for d in ("fp32", "bf16")],
    ),
    (
        "4.2M-parameter MLP: {1.09} x the floor, still {0.77} x SAM",
        lambda: [
            num(BENCHMARKS, OVERHEAD["mlp"], "acr p=2 a=0.5 n=all", "/floor"),
            num(BENCHMARKS, OVERHEAD["mlp"], "acr p=2 a=1 n=all", "/peer"),
        ],
    ),
    ("{1.23} x a plain AdamW step at k=5", lambda: [num(BENCHMARKS, OVERHEAD["fp32"], "amortized k=5", "/base")]),
    (
        "keeping a {4}x cut of the indicator",
        lambda: [
            num(BENCHMARKS, "## What robustness the amortized mode keeps", "AdamW", "I @ eps 0.25")
            / num(BENCHMARKS, "## What robustness the amortized mode keeps", "ACR amortized k=5", "I @ eps 0.25")
        ],
    ),
    (
        "ACR stays at {1.04}-{1.08} x the two-pass floor at every size, holding {1.00} x the parameters",
        lambda: [
            min(float(r["ACR/floor"]) for r in table(BENCHMARKS, "**Step time and memory**") if "GPT-2" in r["model"]),
            max(float(r["ACR/floor"]) for r in table(BENCHMARKS, "**Step time and memory**") if "GPT-2" in r["model"]),
            max(float(r["ACR held"]) for r in table(BENCHMARKS, "**Step time and memory**")),
        ],
    ),
    (
        "~{15} % on top ({47.6} s for the 100M model",
        lambda: [
            100 * (num(BENCHMARKS, "**`probe()` on the 100M model**", "15 (+1)", "probe / predicted") - 1),
            num(BENCHMARKS, "**`probe()` on the 100M model**", "15 (+1)", "probe s"),
        ],
    ),
    (
        "at 200 steps Marian's BLEU is {0.2}-{9.4})",
        lambda: frontier_column("de_en", "bleu"),
    ),
    (
        "some ACR setting dominates {7} of the {11} peer settings on GPT-2 and {8} of {11} on Marian, {5} and {6} "
        "without the margin",
        lambda: [
            *after(BENCHMARKS, FRONTIER["lm"], DOMINATE)[:2],
            *after(BENCHMARKS, FRONTIER["de_en"], DOMINATE)[:2],
            after(BENCHMARKS, FRONTIER["lm"], DOMINATE)[2],
            after(BENCHMARKS, FRONTIER["de_en"], DOMINATE)[2],
        ],
    ),
    (
        "({0} of {16} pairs on GPT-2; on Marian {1} of {24}:",
        lambda: [*after(BENCHMARKS, FRONTIER["lm"], RESOLVED), *after(BENCHMARKS, FRONTIER["de_en"], RESOLVED)],
    ),
    (
        "GSAM at rho = eps on GPT-2 (a {5} % lower loss increase than ACR's best at its clean loss) and FriendlySAM "
        "on Marian ({9} % lower)",
        lambda: [
            lower(
                num(BENCHMARKS, FRONTIER["lm"], "`gsam_tuned`", "ΔL eps 0.5"),
                num(BENCHMARKS, FRONTIER["lm"], "`acr_n1pct`", "ΔL eps 0.5"),
            ),
            lower(
                num(BENCHMARKS, FRONTIER["de_en"], "`friendlysam_tuned`", "ΔL eps 0.5"),
                num(BENCHMARKS, FRONTIER["de_en"], "`acr_a1_n1pct`", "ΔL eps 0.5"),
            ),
        ],
    ),
    (
        "ACR every 10th step at 5x eps cuts GPT-2's loss increase {3.2}x for {1.1}x AdamW's compute",
        lambda: [
            num(BENCHMARKS, FRONTIER["lm"], "`adamw_1x`", "ΔL eps 0.5")
            / num(BENCHMARKS, FRONTIER["lm"], "`acr_a1_k10_eps5x`", "ΔL eps 0.5"),
            num(BENCHMARKS, FRONTIER["lm"], "`acr_a1_k10_eps5x`", "passes (x AdamW)"),
        ],
    ),
    # Does it reproduce the paper?
    ("the gradient corruption does {280} to {13,500} times more damage", corruption_ratios),
    ("LayerNorm ranks 3rd of 4 in each of its {3} runs", gpt2_runs_third),
    (
        "`eps`, {1.8} times below the embedding at the paper's `eps = 0.2`",
        lambda: [num(RESULTS, "<!-- table:converged-marian-fragile -->", "0.2", "most fragile / norm")],
    ),
    (
        "the most fragile type in {5} of the {30} run x `eps` cells, {4} of them in the GPU run of seed 0 "
        "(at `eps = 1`, {2.28} against {1.23} for the embedding)",
        norm_first_cells,
    ),
    (
        "its clean cost is not resolved (perplexity {+17.4} ± {23.8}, paired)",
        lambda: [num(RESULTS, FAULTS, "clean", FAULT_COLUMN["ACR"], k, index=1) for k in (0, 1)],
    ),
    (
        "test perplexity {59.85} against {67.54} (paired {-7.69} ± {5.31}, 95 % CI, lower in {3} of {3} seeds; "
        "Welch p {0.025})",
        lambda: [
            num(RESULTS, LSTM, ACR["lstm"], "test ppl"),
            num(RESULTS, LSTM, "adamw", "test ppl"),
            *(num(RESULTS, LSTM, ACR["lstm"], PAIRED["ppl"], k) for k in (0, 1, 4, 2)),
            num(RESULTS, LSTM, ACR["lstm"], WELCH["ppl"], 2),
        ],
    ),
    (
        "a {27} % smaller loss increase",
        lambda: [lower(num(RESULTS, LSTM, ACR["lstm"], "ΔL, eps 1"), num(RESULTS, LSTM, "adamw", "ΔL, eps 1"))],
    ),
    (
        "lowers the loss increase by {16} % (lower in {3} of {3} seeds) while clean perplexity moves within the noise "
        "(paired {-0.31} ± {0.70})",
        lambda: [
            lower(num(RESULTS, GPT2, ACR["gpt2"], "ΔL, eps 1"), num(RESULTS, GPT2, "adamw", "ΔL, eps 1")),
            num(RESULTS, GPT2, ACR["gpt2"], PAIRED["ΔL eps 1"], 4),
            num(RESULTS, GPT2, ACR["gpt2"], PAIRED["ΔL eps 1"], 2),
            *(num(RESULTS, GPT2, ACR["gpt2"], PAIRED["ppl"], k) for k in (0, 1)),
        ],
    ),
    (
        "scores a higher BLEU than the AdamW run of the same seed and device in {3} of {3} seeds (paired {+0.88} ± "
        "{0.66}), but {+0.22} ± {0.17} against the same seed's AdamW run on the other device and {+0.55} ± {0.72} "
        "against all six AdamW runs (Welch p {0.11}), and its loss increase is not lower ({-0.029} ± {0.108}); SAM's "
        "is lower in {3} of {3} seeds (paired {-0.074} ± {0.081}, unpaired Welch p {0.019})",
        lambda: [
            *(num(RESULTS, MARIAN, ACR["marian"], PAIRED["BLEU"], k) for k in (3, 2, 0, 1)),
            *(
                num(RESULTS, MARIAN, ACR["marian"], "BLEU - AdamW of the seed on the other device (paired)", k)
                for k in (0, 1)
            ),
            *(num(RESULTS, MARIAN, ACR["marian"], WELCH["BLEU"], k) for k in (0, 1, 2)),
            *(num(RESULTS, MARIAN, ACR["marian"], PAIRED["ΔL eps 1"], k) for k in (0, 1)),
            *(num(RESULTS, MARIAN, SAM_MARIAN, PAIRED["ΔL eps 1"], k) for k in (4, 2, 0, 1)),
            num(RESULTS, MARIAN, SAM_MARIAN, WELCH["ΔL eps 1"], 2),
        ],
    ),
    (
        "(LSTM {-10.10} against {-6.90} and {-6.06})",
        lambda: [
            num(RESULTS, LSTM_RUNS, ("acr", str(seed)), "ppl - AdamW (same seed, same device)") for seed in (0, 1, 2)
        ],
    ),
]


def matches(quoted: str, value: float) -> bool:
    """``quoted`` is ``value`` at ``quoted``'s precision (half a unit of its last decimal, or of its last non-zero digit
    for a round integer)."""
    digits = quoted.lstrip("+-").replace(",", "")
    if "." in digits:
        unit = 10.0 ** -len(digits.split(".")[1])
    else:
        unit = 10.0 ** (len(digits) - len(digits.rstrip("0"))) if digits.strip("0") else 1.0
    return abs(float(digits) * (-1 if quoted.startswith("-") else 1) - value) <= unit / 2 + 1e-9


@pytest.mark.parametrize("quote, values", QUOTES, ids=[re.sub("[{}]", "", q)[:50] for q, _ in QUOTES])
def test_the_readme_quotes_its_tables(quote, values):
    readme = " ".join(README.read_text().split())
    assert " ".join(quote.replace("{", "").replace("}", "").split()) in readme, f"README.md no longer says: {quote}"
    quoted = re.findall(r"\{([^}]*)\}", quote)
    expected = list(values())
    assert len(quoted) == len(expected), (quoted, expected)
    wrong = [(q, v) for q, v in zip(quoted, expected) if not matches(q, v)]
    assert not wrong, f"README numbers that are not their table's entries (quoted, table): {wrong}"


def test_a_quote_that_drifts_from_its_table_fails():
    assert matches("1.8", 1.82) and matches("280", 281) and matches("13,500", 13_500) and matches("-0.0235", -0.0235)
    assert not matches("1.9", 1.82) and not matches("270", 281) and not matches("+0.54", 0.549)
    assert matches("27", 26.7) and not matches("-27", 26.7)
