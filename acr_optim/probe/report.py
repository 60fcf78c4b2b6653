"""Tidy probe tables (CSV / JSON / Markdown, config embedded) and their figures (matplotlib PNGs)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

__all__ = ["ProbeTable"]

PathLike = str | Path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _config_text(value: Any) -> str:
    """A config value in Markdown: lists comma-separated (None as ``all``, the n grid's "no limit"),
    dicts as ``key: value; ...`` (``none`` when empty)."""
    if isinstance(value, list):
        return ", ".join(_fmt(x) or "all" for x in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_config_text(v)}" for k, v in value.items()) or "none"
    return _fmt(value)


def _is_fault(row: dict[str, Any]) -> bool:
    """Fault rows (``method`` a fault spec) have no ``eps``."""
    return row.get("eps") is None


@dataclass
class ProbeTable:
    """One row per (group, method, n, eps), and per (group, fault), with the run's ``config``.

    CSV rows carry the config scalars (model, p, seed, ...) as extra columns so every file is
    self-describing; JSON holds ``{"config": ..., "rows": [...]}``; Markdown lists the config
    above the table.  ``n = None`` (no L0 limit) is written as an empty CSV cell / ``all``; fault
    rows have ``eps = p = n = None`` (empty cells; their ``norm`` is in the config's ``p``),
    ``method`` set to the fault spec, and NaN loss columns when ``trials`` is 0 (not measured).
    """

    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def select(self, **where: Any) -> list[dict[str, Any]]:
        """Rows whose columns equal every ``where`` value."""
        return [row for row in self.rows if all(row.get(k) == v for k, v in where.items())]

    def to_json(self, path: PathLike | None = None) -> str:
        text = json.dumps({"config": self.config, "rows": self.rows}, indent=2, allow_nan=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: PathLike) -> ProbeTable:
        data = json.loads(Path(path).read_text())
        return cls(rows=data["rows"], config=data["config"])

    def to_csv(self, path: PathLike | None = None) -> str:
        scalars = {k: v for k, v in self.config.items() if not isinstance(v, (list, dict)) and k not in self.columns}
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns + list(scalars), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**{k: "" if v is None else v for k, v in row.items()}, **scalars})
        if path is not None:
            Path(path).write_text(out.getvalue())
        return out.getvalue()

    def to_markdown(self, path: PathLike | None = None, columns: Sequence[str] | None = None) -> str:
        cols = list(columns) if columns is not None else self.columns
        lines = [f"- **{k}**: {_config_text(v)}" for k, v in self.config.items()]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.rows:
            cells = [
                ("all" if k == "n" and row.get(k) is None and not _is_fault(row) else _fmt(row.get(k))) for k in cols
            ]
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def _default(self, key: str) -> Any:
        """``key`` of the first ``eps`` row (not a fault row)."""
        return next((row[key] for row in self.rows if not _is_fault(row)), None)

    def heatmap(
        self,
        path: PathLike,
        value: str = "delta_loss",
        method: str | None = None,
        n: int | None | str = "first",
        title: str | None = None,
    ) -> Figure:
        """Group x eps heatmap of ``value`` (warmer = larger = worse) for one method and ``n``.

        Returns the figure (also saved to ``path``).  Every method's heatmap at this ``n`` shares one
        logarithmic colour scale (from all their ``eps`` rows), so the gradient and random figures
        compare cell by cell.  Cells without a colour say why, in a legend: a mean within its
        standard deviation over the draws (``|value| <= value_std``, e.g. random corruptions that
        move the loss less than their own spread) is noise, hatched grey; a value <= 0 (the loss
        did not increase) is white, off the scale; inf/NaN is dark grey.  ``method``/``n`` default
        to the first ``eps`` row's; fault rows have their own :meth:`fault_heatmap`.
        """
        method = method or self._default("method")
        n = self._default("n") if n == "first" else n
        rows = [r for r in self.select(method=method, n=n) if not _is_fault(r)]
        if not rows:
            hint = " (fault rows: use fault_heatmap)" if self.select(method=method) else ""
            raise ValueError(f"no rows with method={method!r} and n={n!r}{hint}")
        groups = list(dict.fromkeys(r["group"] for r in rows))
        eps = sorted({r["eps"] for r in rows})
        grid: list[list[_Cell | None]] = [[None] * len(eps) for _ in groups]
        for r in rows:
            grid[groups.index(r["group"])][eps.index(r["eps"])] = _Cell.of(r, value)
        shared = [_Cell.of(r, value) for r in self.select(n=n) if not _is_fault(r)]
        trials = max(r.get("trials", 1) for r in rows)
        norm_name = _norm_name(self._default("p"))
        title = title or (
            f"{_title_case(_label(value))} under {_METHOD_LABELS.get(method, method)}"
            + (f", mean of {trials} draws" if trials > 1 else "")
            + f"\n{norm_name} norm eps, {_entries(n)}"
        )
        return _draw_grid(
            path,
            grid,
            groups,
            [f"{e:g}" for e in eps],
            f"eps ({norm_name} norm of the corruption)",
            _label(value),
            title,
            _colour_norm([c.value for c in shared if c.state == "value"]),
        )

    def fault_heatmap(
        self, path: PathLike, value: str = "delta_loss", faults: Sequence[str] | None = None, title: str | None = None
    ) -> Figure:
        """Group x fault heatmap of ``value`` (warmer = worse): which layer breaks under which fault.

        Returns the figure (also saved to ``path``).  ``faults`` (specs, default every fault of the
        table, in order) pick and order the columns.  Colours as in :meth:`heatmap` (the scale from
        these cells alone); a fault that touches none of a group's parameters (``trials`` 0: int8
        leaves 1-D weights in float) is not measured, drawn hatched white with "n/a", not as an
        unaffected 0.
        """
        rows = [r for r in self.rows if _is_fault(r)]
        faults = list(faults) if faults is not None else list(dict.fromkeys(r["method"] for r in rows))
        rows = [r for r in rows if r["method"] in faults]
        if not rows:
            raise ValueError(f"no fault rows for faults={faults!r}")
        groups = list(dict.fromkeys(r["group"] for r in rows))
        grid: list[list[_Cell | None]] = [[None] * len(faults) for _ in groups]
        for r in rows:
            grid[groups.index(r["group"])][faults.index(r["method"])] = _Cell.of(r, value)
        cells = [cell for line in grid for cell in line if cell is not None]
        return _draw_grid(
            path,
            grid,
            groups,
            faults,
            "fault (acr_optim.faults spec)",
            _label(value),
            title or f"{_title_case(_label(value))} under real-world faults",
            _colour_norm([c.value for c in cells if c.state == "value"]),
        )

    def curve(
        self,
        path: PathLike,
        value: str = "loss",
        group: str | None = None,
        n: int | None | str = "first",
        title: str | None = None,
    ) -> Figure:
        """``value`` vs eps (log x; log y when positive values span over a decade), one line per method for
        ``group`` (default ``"all"`` or the first group), with the clean value dashed and, for
        ``value="loss"``, random's +-1 std band (paper Figure 3); returns the figure."""
        from matplotlib.figure import Figure

        groups = list(dict.fromkeys(r["group"] for r in self.rows))
        group = group or ("all" if "all" in groups else groups[0])
        n = self._default("n") if n == "first" else n
        rows = [r for r in self.select(group=group, n=n) if not _is_fault(r)]
        if not rows:
            raise ValueError(f"no eps rows with group={group!r} and n={n!r}")
        fig = Figure(figsize=(5, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for method in dict.fromkeys(r["method"] for r in rows):
            line = sorted((r for r in rows if r["method"] == method), key=lambda r: r["eps"])
            xs, ys = [r["eps"] for r in line], [r[value] for r in line]
            (handle,) = ax.plot(xs, ys, marker="o", label=_METHOD_LABELS.get(method, method))
            if value == "loss" and any(r["delta_loss_std"] for r in line):
                std = [r["delta_loss_std"] for r in line]
                ax.fill_between(
                    xs,
                    [y - s for y, s in zip(ys, std)],
                    [y + s for y, s in zip(ys, std)],
                    color=handle.get_color(),
                    alpha=0.2,
                )
        clean = f"{value}_clean" if f"{value}_clean" in rows[0] else "loss_clean" if value == "loss" else None
        if clean is not None:
            ax.axhline(rows[0][clean], color="grey", linestyle="--", label="clean model")
        ax.set_xscale("log")
        values = [r[value] for r in rows if math.isfinite(r[value])]
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        norm_name = _norm_name(self._default("p"))
        ax.set_xlabel(f"eps ({norm_name} norm of the corruption)")
        ax.set_ylabel(_label(value))
        ax.legend(fontsize=7)
        where = "all parameters" if group == "all" else f"group {group}"
        ax.set_title(title or f"{_title_case(_label(value))} vs corruption size, {where}\n{_entries(n)}", fontsize=9)
        fig.savefig(path, dpi=120)
        return fig


# Readable names of the columns and methods, for titles, axes and legends.
_VALUE_LABELS = {
    "delta_loss": "loss increase L(w+a) - L(w)",
    "delta_loss_max": "largest loss increase over the draws",
    "delta_loss_std": "std of the loss increase over the draws",
    "loss": "loss L(w+a)",
    "first_order": "first-order estimate g.a",
    "norm": "norm of the change w' - w",
    "norm_inf": "largest weight change max |w' - w|",
    "l0": "changed entries",
    "broken": "share of draws with an infinite loss",
    "perplexity": "perplexity",
    "accuracy": "accuracy",
    "token_accuracy": "token accuracy",
    "bleu": "BLEU",
}
_METHOD_LABELS = {
    "gradient": "gradient corruption (first-order worst case)",
    "random": "random corruption",
    "pgd": "PGD corruption (gradient ascent)",
}
# How the cells that carry no colour are drawn, and what the legend says of them.
_STYLES: dict[str, dict[str, Any]] = {
    "noise": {"facecolor": "whitesmoke", "edgecolor": "darkgrey", "hatch": "...", "linewidth": 0},
    "not positive": {"facecolor": "white", "edgecolor": "darkgrey", "linewidth": 0.5},
    "not measured": {"facecolor": "white", "edgecolor": "darkgrey", "hatch": "///", "linewidth": 0},
    "broken": {"facecolor": "dimgrey", "edgecolor": "dimgrey", "linewidth": 0},
}
_LEGEND = {
    "noise": "noise: |mean| <= std over the draws (not coloured)",
    "not positive": "<= 0: no increase, off the log colour scale",
    "not measured": "n/a: not measured (the fault leaves these parameters unchanged)",
    "broken": "inf / NaN: the model broke",
}


def _label(value: str) -> str:
    """The readable name of column ``value`` (its name with spaces for columns without one)."""
    return _VALUE_LABELS.get(value, value.replace("_", " "))


def _title_case(text: str) -> str:
    """``text`` with its first letter upper case (the rest as it is: ``L(w)`` stays)."""
    return text[:1].upper() + text[1:]


def _norm_name(p: float | None) -> str:
    """``"L2"``, ``"L1.5"``, ``"L-inf"``."""
    return "L-inf" if p == math.inf else f"L{_fmt(p)}"


def _entries(n: int | None) -> str:
    """What the L0 limit ``n`` allows, in words."""
    return "any number of entries" if n is None else f"at most {n} entries"


@dataclass(frozen=True)
class _Cell:
    """One heatmap cell: the row's ``value``, its std over the draws and whether it was measured at all
    (rows without ``trials``, such as hand-made ones, count as measured once)."""

    value: float
    std: float
    measured: bool

    @classmethod
    def of(cls, row: dict[str, Any], value: str) -> _Cell:
        std = row.get(f"{value}_std")
        return cls(float(row[value]), math.nan if std is None else float(std), row.get("trials", 1) > 0)

    @property
    def state(self) -> str:
        """``"value"`` (coloured), ``"noise"``, ``"not positive"``, ``"not measured"`` or ``"broken"`` (inf/NaN)."""
        if not self.measured:
            return "not measured"
        if not math.isfinite(self.value):
            return "broken"
        if self.std > 0 and abs(self.value) <= self.std:
            return "noise"
        return "value" if self.value > 0 else "not positive"


def _colour_norm(values: Sequence[float]) -> Normalize:
    """The logarithmic colour scale of the (positive) coloured ``values``."""
    from matplotlib.colors import LogNorm, Normalize

    return LogNorm(min(values), max(values)) if values else Normalize(0.0, 1.0)


def _draw_grid(
    path: PathLike,
    grid: list[list[_Cell | None]],
    rows: list[str],
    columns: list[str],
    xlabel: str,
    value: str,
    title: str,
    norm: Normalize,
) -> Figure:
    """A rows x columns heatmap PNG of ``grid`` (values written in the cells, cells without colour
    explained in a legend below, a colour bar when any cell is coloured); returns the figure.
    Missing cells (None) stay blank."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    values = np.array([[math.nan if c is None else c.value for c in line] for line in grid], dtype=float)
    coloured = np.array([[c is not None and c.state == "value" for c in line] for line in grid])
    states = {c.state for line in grid for c in line if c is not None} - {"value"}
    fig = Figure(
        figsize=(1.1 * len(columns) + 2.5, 0.45 * len(rows) + 1.8 + 0.2 * len(states)), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_array(values, mask=~coloured),
        cmap=colormaps["YlOrRd"].with_extremes(bad="white"),
        norm=norm,
        aspect="auto",
    )
    slanted = max(map(len, columns)) > 8
    ax.set_xticks(range(len(columns)), columns, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    for i, line in enumerate(grid):
        for j, cell in enumerate(line):
            if cell is None:
                continue
            if cell.state != "value":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **_STYLES[cell.state]))
            text = "n/a" if cell.state == "not measured" else f"{cell.value:.3g}"
            if cell.state == "value":
                colour = "white" if norm(cell.value) > 0.6 else "black"
            else:
                colour = "white" if cell.state == "broken" else "dimgrey"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    if states:
        handles = [Patch(label=_LEGEND[s], **_STYLES[s]) for s in _LEGEND if s in states]
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, frameon=False)
    if coloured.any():
        fig.colorbar(image, ax=ax, label=value)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    return fig
