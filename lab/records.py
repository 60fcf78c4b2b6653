"""Results as data: one small JSON record per finished run, committed under ``experiments/results/``.

A record lives at ``experiments/results/<finding>/<task>/<run_id>.json`` and holds what the run
was (task, recipe and all its settings, seed) and what came out (steps, epochs, best-validation
step, wall seconds, clean and corrupted metrics); never model weights.  Runners skip a run whose
record exists, so an interrupted batch of runs resumes where it stopped, and
``experiments/summarize.py`` builds the tables of docs/results.md from the records alone.
Benchmarks keep theirs under ``benchmarks/results/`` (pass ``root``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def record_path(finding: str, task: str, run_id: str, root: Path = RESULTS) -> Path:
    """Where the record of run ``run_id`` of ``finding`` on ``task`` lives under ``root``."""
    return root / finding / task / f"{run_id}.json"


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(<path>.partial)``, then rename it to ``path``: a reader or a killed writer never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    write(partial)
    partial.replace(path)


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically (:func:`write_atomically`)."""
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n"
    write_atomically(path, lambda partial: partial.write_text(text))


def claim(path: Path) -> bool:
    """Claim the run whose record will be ``path`` for this process (an exclusive ``.claim`` file beside it), so that
    several workers started on the same plan split it; returns ``False`` while another live process holds it.
    A claim left by a process that is gone (or by another machine: this tree was copied) is taken over."""
    lock = path.with_suffix(".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def _held(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
    except (FileNotFoundError, ValueError):  # released, or being written by its new owner right now
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release(path: Path) -> None:
    """Drop this process's claim on ``path``'s run (after writing its record, or when the run failed)."""
    path.with_suffix(".claim").unlink(missing_ok=True)


def commit_record(path: Path, finding: str) -> None:
    """``git add`` and commit this one record, retrying while another process holds the index lock, so that
    a long batch of runs keeps every finished record even if the session ends mid-batch."""
    message = f"{finding}: record {path.stem}"
    for attempt in range(20):
        add = subprocess.run(["git", "add", "--", str(path)], check=False, capture_output=True)
        if add.returncode == 0:
            done = subprocess.run(["git", "commit", "-m", message, "--", str(path)], check=False, capture_output=True)
            if done.returncode == 0:
                return
        time.sleep(3 + attempt)
    print(f"  could not commit {path}", flush=True)


def read_record(path: Path) -> dict[str, Any]:
    """The record at ``path``."""
    return json.loads(path.read_text())


def load_records(finding: str, root: Path = RESULTS) -> list[dict[str, Any]]:
    """Every record of ``finding``, ordered by task then run id."""
    return [read_record(path) for path in sorted((root / finding).glob("*/*.json"))]


def chosen_eps(records: list[dict[str, Any]], grid: list[float] | None = None) -> float | None:
    """The ACR eps of lowest held-out loss among the sweep records of a converged family (the records of one
    family); with ``grid``, only once every eps of it has a record (``None`` before)."""
    sweep = {
        r["settings"]["method"]["eps"]: r for r in records if r["settings"]["stage"] == "sweep" and r["method"] == "acr"
    }
    if not sweep or (grid is not None and not set(grid) <= set(sweep)):
        return None
    return min(sweep.values(), key=lambda r: r["validation"]["loss"])["settings"]["method"]["eps"]


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration (cache folders, record ids)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV (union of keys, in first-seen order; ``None`` as an empty cell)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file written by :func:`write_rows` (every cell a string)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (paths and other objects as strings, ``inf``/``nan`` kept)."""
    path.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True) + "\n")
