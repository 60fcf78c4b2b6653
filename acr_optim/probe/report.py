"""Tidy probe tables (CSV / JSON / Markdown, config embedded) and their figures (matplotlib PNGs)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ProbeTable"]

PathLike = str | Path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_fault(row: dict[str, Any]) -> bool:
    """Fault rows (``method`` a fault spec) have no ``eps``."""
    return row.get("eps") is None


@dataclass
class ProbeTable:
    """One row per (group, method, n, eps), and per (group, fault), with the run's ``config``.

    CSV rows carry the config scalars (model, p, seed, ...) as extra columns so every file is
    self-describing; JSON holds ``{"config": ..., "rows": [...]}``; Markdown lists the config
    above the table.  ``n = None`` (no L0 limit) is written as an empty CSV cell / ``all``; fault
    rows have ``eps = n = None`` (empty cells) and ``method`` set to the fault spec.
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
        lines = [
            f"- **{k}**: {_fmt(v) if not isinstance(v, list) else ', '.join(_fmt(x) or 'all' for x in v)}"
            for k, v in self.config.items()
        ]
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
    ) -> None:
        """Group x eps heatmap of ``value`` (warmer = larger = worse) for one method and ``n``.

        Log colour scale when every value is positive.  ``method``/``n`` default to the first
        ``eps`` row's; fault rows have their own :meth:`fault_heatmap`.
        """
        method = method or self._default("method")
        n = self._default("n") if n == "first" else n
        rows = [r for r in self.select(method=method, n=n) if not _is_fault(r)]
        if not rows:
            hint = " (fault rows: use fault_heatmap)" if self.select(method=method) else ""
            raise ValueError(f"no rows with method={method!r} and n={n!r}{hint}")
        groups = list(dict.fromkeys(r["group"] for r in rows))
        eps = sorted({r["eps"] for r in rows})
        grid = [[math.nan] * len(eps) for _ in groups]
        for r in rows:
            grid[groups.index(r["group"])][eps.index(r["eps"])] = r[value]
        n_text = "all" if n is None else n
        title = title or f"{value}: {method}, p={_fmt(self._default('p'))}, n={n_text}"
        _draw_grid(path, grid, groups, [f"{e:g}" for e in eps], "eps", value, title)

    def fault_heatmap(
        self, path: PathLike, value: str = "delta_loss", faults: Sequence[str] | None = None, title: str | None = None
    ) -> None:
        """Group x fault heatmap of ``value`` (warmer = worse): which layer breaks under which fault.

        ``faults`` (specs, default every fault of the table, in order) pick and order the
        columns.  Log colour scale when every finite value is positive; inf/NaN cells are dark grey.
        """
        rows = [r for r in self.rows if _is_fault(r)]
        faults = list(faults) if faults is not None else list(dict.fromkeys(r["method"] for r in rows))
        rows = [r for r in rows if r["method"] in faults]
        if not rows:
            raise ValueError(f"no fault rows for faults={faults!r}")
        groups = list(dict.fromkeys(r["group"] for r in rows))
        grid = [[math.nan] * len(faults) for _ in groups]
        for r in rows:
            grid[groups.index(r["group"])][faults.index(r["method"])] = r[value]
        _draw_grid(path, grid, groups, faults, "fault", value, title or f"{value} under faults")

    def curve(
        self,
        path: PathLike,
        value: str = "loss",
        group: str | None = None,
        n: int | None | str = "first",
        title: str | None = None,
    ) -> None:
        """``value`` vs eps (log x; log y when positive values span over a decade), one line per method for
        ``group`` (default ``"all"`` or the first group), with the clean value dashed and, for
        ``value="loss"``, random's +-1 std band (paper Figure 3)."""
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
            (handle,) = ax.plot(xs, ys, marker="o", label=method)
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
            ax.axhline(rows[0][clean], color="grey", linestyle="--", label="clean")
        ax.set_xscale("log")
        values = [r[value] for r in rows if math.isfinite(r[value])]
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel("eps")
        ax.set_ylabel(value)
        ax.legend()
        n_text = "all" if n is None else n
        ax.set_title(title or f"{group}: p={_fmt(self._default('p'))}, n={n_text}", fontsize=9)
        fig.savefig(path, dpi=120)


def _draw_grid(
    path: PathLike, grid: list[list[float]], rows: list[str], columns: list[str], xlabel: str, value: str, title: str
) -> None:
    """A rows x columns heatmap PNG of ``grid``, values written in the cells; log colours when all finite ones are > 0."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    finite = [v for line in grid for v in line if math.isfinite(v)]
    norm = LogNorm() if finite and min(finite) > 0 else Normalize()
    fig = Figure(figsize=(1.1 * len(columns) + 2.5, 0.45 * len(rows) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    image = ax.imshow(data, cmap=colormaps["YlOrRd"].with_extremes(bad="dimgrey"), norm=norm, aspect="auto")
    slanted = max(map(len, columns)) > 8
    ax.set_xticks(range(len(columns)), columns, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            dark = not math.isfinite(v) or norm(v) > 0.6
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=value)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
