"""Reading the data of ``acr-probe`` and the recipes with ``datasets``.

Files go through the ``datasets`` builders (``json`` for ``.json``/``.jsonl``, ``csv`` for
``.csv``, ``text`` for anything else, one row a line; compression is detected by the builders),
folders written by ``save_to_disk`` through ``load_from_disk``, anything else is a hub dataset
name for ``load_dataset``.  Written here is only what the builders lack: pairing line-aligned
files such as ``train.de`` + ``train.en`` into a ``translation`` column, and errors that name
the argument and the file at fault.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = [
    "builder_for",
    "check_local_path",
    "infer_languages",
    "load_data",
    "load_files",
    "load_parallel",
    "looks_like_path",
    "parallel_files",
]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be meant as a local path, not a hub id (``org/name``).

    True for absolute and ``./``/``../``/``~`` paths, several ``/``, a ``\\``, a known file
    suffix, or an ``a/b`` whose ``a`` is an existing local folder (``outputs/de_en``).
    """
    if spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1:
        return True
    if Path(spec).suffix in (*_BUILDERS, ".txt", *_COMPRESSION):
        return True
    head, sep, _ = spec.partition("/")
    return bool(sep) and Path(head).is_dir()


def check_local_path(spec: str, name: str, prefix: bool = False) -> None:
    """Raise :class:`UsageError` naming ``name`` when ``spec`` is path-like (see :func:`looks_like_path`) but
    does not exist, so a typo fails at once instead of after a hub lookup.  With ``prefix``, the
    prefix of a line-aligned pair (``data/train`` of ``data/train.de``) counts as existing."""
    path = Path(os.path.expanduser(spec))
    if not looks_like_path(spec) or path.exists():
        return
    if prefix and any(f.is_file() for f in path.parent.glob(f"{glob.escape(path.name)}.*")):
        return
    raise UsageError(f"{name} {spec}: no such file or folder")


def builder_for(path: str | Path) -> str:
    """The ``datasets`` builder of a file: ``json``, ``csv`` or ``text`` (after stripping a compression suffix)."""
    path = Path(path)
    suffix = path.suffix
    if suffix in _COMPRESSION and len(path.suffixes) > 1:
        suffix = path.suffixes[-2]
    return _BUILDERS.get(suffix, "text")


def load_files(files: Sequence[str | Path], name: str = "--data") -> Any:
    """One ``datasets.Dataset`` from local files of one kind (see :func:`builder_for`); a ``text`` row is a line.

    Raises :class:`UsageError` naming ``name`` for a missing file, files of different kinds, or no rows.
    """
    import datasets

    files = [Path(os.path.expanduser(str(f))) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{name} {missing[0]}: no such file")
    kinds = {builder_for(f) for f in files}
    if len(kinds) != 1:
        raise UsageError(f"{name}: the files must be of one kind (text, json or csv), got {sorted(kinds)}")
    shown = ", ".join(map(str, files))
    try:
        rows = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        if isinstance(cause, datasets.arrow_writer.SchemaInferenceError):  # not a single row to infer columns from
            raise UsageError(f"{name} {shown}: the file is empty") from None
        raise UsageError(f"{name} {shown}: cannot be read ({type(cause).__name__}: {cause})") from None
    if len(rows) == 0:
        raise UsageError(f"{name} {shown}: the file is empty")
    return rows


def _existing(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def parallel_files(spec: str, source_lang: str, target_lang: str, name: str = "--data") -> tuple[Path, Path]:
    """The ``(source, target)`` files of a line-aligned pair named by ``spec``.

    ``spec`` is a prefix (``data/train`` for ``data/train.de`` + ``data/train.en``, each optionally
    ``.gz``) or the source file itself (``data/train.de.gz``: the target is ``data/train.en.gz``).
    Raises :class:`UsageError` naming ``name`` when a file of the pair is missing.
    """
    path = Path(os.path.expanduser(spec))
    for suffix in ("", ".gz"):
        ending = f".{source_lang}{suffix}"
        if path.name.endswith(ending) and path.is_file():
            stem = path.name[: -len(ending)]
            target = _existing([path.with_name(f"{stem}.{target_lang}{s}") for s in (suffix, ".gz", "")])
            if target is None:
                raise UsageError(f"{name} {spec}: no target file {stem}.{target_lang}[.gz] next to it")
            return path, target
    source = _existing([Path(f"{path}.{source_lang}{s}") for s in ("", ".gz")])
    target = _existing([Path(f"{path}.{target_lang}{s}") for s in ("", ".gz")])
    if source is None or target is None:
        raise UsageError(
            f"{name} {spec}: no such file; expected {spec}.{source_lang}[.gz] and {spec}.{target_lang}[.gz], "
            f"a source file ending in .{source_lang}[.gz], or a .json/.jsonl file"
        )
    return source, target


def infer_languages(source_file: str) -> tuple[str, str]:
    """``(source_lang, target_lang)`` of ``X.src[.gz]`` from its one partner ``X.tgt[.gz]`` in the same folder.

    Raises :class:`UsageError` when the name has no language suffix or the partner is missing or ambiguous.
    """
    path = Path(os.path.expanduser(source_file))
    name = path.name.removesuffix(".gz")
    stem, dot, source_lang = name.rpartition(".")
    if not dot or not stem or not source_lang.isalpha():
        raise UsageError(
            f"{source_file}: cannot tell the language pair from the name; give --source-lang and --target-lang, "
            "or the targets with --target-data"
        )
    partners = sorted(
        {
            lang
            for f in path.parent.glob(f"{stem}.*")
            for lang in [f.name.removeprefix(f"{stem}.").removesuffix(".gz")]
            if lang.isalpha() and lang != source_lang and f.is_file()
        }
    )
    if len(partners) != 1:
        found = f"found {', '.join(partners)}" if partners else "found none"
        raise UsageError(
            f"{source_file}: need exactly one line-aligned partner {stem}.<lang>[.gz] next to it ({found}); "
            "give --target-lang, or the targets with --target-data"
        )
    return source_lang, partners[0]


def load_parallel(spec: str, source_lang: str, target_lang: str, name: str = "--data") -> Any:
    """A dataset of ``{"translation": {source_lang: ..., target_lang: ...}}`` rows (the hub's layout) from
    JSON lines with that column or from a line-aligned pair (see :func:`parallel_files`).

    Raises :class:`UsageError` naming ``name`` when the files are missing, empty or of different lengths.
    """
    import datasets

    if builder_for(spec) == "json":
        return load_files([spec], name)
    source, target = parallel_files(spec, source_lang, target_lang, name)
    src, tgt = load_files([source], name)["text"], load_files([target], name)["text"]
    if len(src) != len(tgt):
        raise UsageError(
            f"{name}: {source} has {len(src)} lines but {target} has {len(tgt)}: the files must be line-aligned"
        )
    return datasets.Dataset.from_dict({"translation": [{source_lang: s, target_lang: t} for s, t in zip(src, tgt)]})


def load_data(
    spec: str | Sequence[str], *, split: str | None = None, config: str | None = None, name: str = "--data"
) -> tuple[Any, dict[str, Any]]:
    """``(rows, source)``: the rows named by ``spec`` and a record of where they came from.

    ``spec`` is local files (see :func:`load_files`), a folder written by ``save_to_disk``
    (``split`` picks from a ``DatasetDict``), or a hub dataset (``config``, ``split``).  ``source``
    is ``{"files": [...]}``, ``{"folder": ..., "split": ...}`` or ``{"dataset": ..., "config": ...,
    "split": ...}`` (``split`` only where one was picked).  Path-like specs that do not exist
    raise :class:`UsageError` at once.
    """
    import datasets

    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise UsageError(f"{name} needs at least one file, folder or dataset name")
    for s in specs:
        check_local_path(s, name)
    first = Path(os.path.expanduser(specs[0]))
    if first.is_dir():
        loaded = datasets.load_from_disk(str(first))
        if isinstance(loaded, datasets.DatasetDict):
            split = split or ("test" if "test" in loaded else None)
            if split not in loaded:
                raise UsageError(f"{name} {first}: no split {split!r}; it holds {sorted(loaded)} (pick with --split)")
            return loaded[split], {"folder": str(first), "split": split}
        return loaded, {"folder": str(first)}
    if first.is_file():
        return load_files(specs, name), {"files": [str(Path(s)) for s in specs]}
    split = split or "test"
    rows = datasets.load_dataset(specs[0], config, split=split)
    return rows, {"dataset": specs[0], "config": config, "split": split}
