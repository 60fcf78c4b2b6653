"""acr_optim.data: the files of acr-probe and the recipes, read through the `datasets` builders."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from acr_optim.data import (
    builder_for,
    check_local_path,
    infer_languages,
    load_data,
    load_files,
    load_parallel,
    looks_like_path,
    parallel_files,
)
from acr_optim.errors import UsageError

LINES = ["Der Hund schläft.", "Es regnet.\r", "", "Ein Mann liest die Zeitung."]


def _write(path: Path, lines: list[str], compress: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


@pytest.mark.parametrize("name, compress", [("x.de", False), ("x.de.gz", True), ("train.txt", True)])
def test_text_files_plain_gzip_and_gzip_without_suffix(tmp_path, name, compress):
    rows = load_files([_write(tmp_path / name, LINES, compress)])
    # one row a line, empty lines kept (they keep pairs aligned), \r\n and \n both end a line
    assert rows["text"] == ["Der Hund schläft.", "Es regnet.", "", "Ein Mann liest die Zeitung."]


def test_builders_and_their_errors(tmp_path):
    assert [builder_for(f) for f in ("a.jsonl", "a.json.gz", "a.csv", "a.txt", "a.de", "a.en.gz")] == [
        "json",
        "json",
        "csv",
        "text",
        "text",
        "text",
    ]
    (tmp_path / "a.csv").write_text("text\nhello\n")
    assert load_files([tmp_path / "a.csv"])["text"] == ["hello"]
    _write(tmp_path / "b.txt", ["x"])
    with pytest.raises(UsageError, match=r"--data: the files must be of one kind"):
        load_files([tmp_path / "a.csv", tmp_path / "b.txt"])
    with pytest.raises(UsageError, match=r"^--train_file .*missing.txt: no such file$"):
        load_files([tmp_path / "missing.txt"], "--train_file")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match=r"^--data .*empty.txt: the file is empty$"):
        load_files([tmp_path / "empty.txt"])


def test_parallel_files_by_prefix_and_by_source_file(tmp_path):
    _write(tmp_path / "train.de.gz", ["a", "b"], compress=True)
    _write(tmp_path / "train.en.gz", ["A", "B"], compress=True)
    _write(tmp_path / "dev.de", ["c"])
    _write(tmp_path / "dev.en", ["C"])
    expected = (tmp_path / "train.de.gz", tmp_path / "train.en.gz")
    assert parallel_files(str(tmp_path / "train"), "de", "en") == expected
    assert parallel_files(str(tmp_path / "train.de.gz"), "de", "en") == expected
    assert parallel_files(str(tmp_path / "dev"), "de", "en") == (tmp_path / "dev.de", tmp_path / "dev.en")
    ds = load_parallel(str(tmp_path / "train"), "de", "en")
    assert ds["translation"] == [{"de": "a", "en": "A"}, {"de": "b", "en": "B"}]
    with pytest.raises(UsageError, match="missing.de"):
        parallel_files(str(tmp_path / "missing"), "de", "en")
    _write(tmp_path / "x.de", ["a", "b"])
    _write(tmp_path / "x.en", ["A"])
    with pytest.raises(UsageError, match=r"^--validation_file: .*x.de has 2 lines but .*x.en has 1"):
        load_parallel(str(tmp_path / "x"), "de", "en", "--validation_file")


def test_language_pair_from_the_file_names(tmp_path):
    for name in ("val.de.gz", "val.en.gz", "solo.de", "three.de", "three.en", "three.fr"):
        _write(tmp_path / name, ["a"])
    assert infer_languages(str(tmp_path / "val.de.gz")) == ("de", "en")
    assert infer_languages(str(tmp_path / "val.en.gz")) == ("en", "de")
    with pytest.raises(UsageError, match=r"exactly one line-aligned partner solo.<lang>\[.gz\] .*found none"):
        infer_languages(str(tmp_path / "solo.de"))
    with pytest.raises(UsageError, match=r"found en, fr"):
        infer_languages(str(tmp_path / "three.de"))


def test_path_like_names_that_do_not_exist_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    _write(tmp_path / "pair.de", ["a"])
    assert looks_like_path("outputs/de_en") and looks_like_path("./m") and looks_like_path("a/b/c")
    assert looks_like_path("data.jsonl") and looks_like_path("~/x")
    assert not looks_like_path("gpt2") and not looks_like_path("Helsinki-NLP/opus-mt-de-en")
    with pytest.raises(UsageError, match=r"^--model outputs/de_en: no such file or folder$"):
        check_local_path("outputs/de_en", "--model")
    check_local_path("Helsinki-NLP/opus-mt-de-en", "--model")  # a hub id: left to the hub
    check_local_path("./pair", "--data", prefix=True)  # the prefix of pair.de
    with pytest.raises(UsageError, match="--data ./pair"):
        check_local_path("./pair", "--data")


def test_load_data_records_where_the_rows_came_from(tmp_path):
    _write(tmp_path / "a.txt", ["x", "y"])
    rows, source = load_data([str(tmp_path / "a.txt")])
    assert rows["text"] == ["x", "y"] and source == {"files": [str(tmp_path / "a.txt")]}
    splits = datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"text": ["v"]}), "test": datasets.Dataset.from_dict({"text": ["t"]})}
    )
    splits.save_to_disk(tmp_path / "saved")
    rows, source = load_data(str(tmp_path / "saved"))
    assert rows["text"] == ["t"] and source == {"folder": str(tmp_path / "saved"), "split": "test"}
    rows, source = load_data(str(tmp_path / "saved"), split="validation")
    assert rows["text"] == ["v"] and source["split"] == "validation"
    with pytest.raises(UsageError, match=r"no split 'train'; it holds \['test', 'validation'\]"):
        load_data(str(tmp_path / "saved"), split="train")
    with pytest.raises(UsageError, match="--data .*nope.txt: no such file or folder"):
        load_data([str(tmp_path / "nope.txt")])
