"""The accelerate recipes (recipes/de_en.py, recipes/lm.py), their data loading and the hub model card."""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from huggingface_hub import ModelCard

from acr_optim.hub import write_model_card

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
sys.path.insert(0, str(RECIPES))

import _common
import de_en
import lm

LINES = ["Der Hund schläft.", "Es regnet.\r", "", "Ein Mann liest die Zeitung."]


def _write(path: Path, lines: list[str], compress: bool) -> None:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if compress else text)


# -- data loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_lines_plain_and_gzip(tmp_path, compress):
    path = tmp_path / ("x.de.gz" if compress else "x.de")
    _write(path, LINES, compress)
    assert _common.read_lines(path) == ["Der Hund schläft.", "Es regnet.", "", "Ein Mann liest die Zeitung."]


def test_gzip_detected_from_content_not_name(tmp_path):
    path = tmp_path / "train.txt"  # gzip data without a .gz suffix
    _write(path, LINES[:2], compress=True)
    assert _common.read_lines(path) == ["Der Hund schläft.", "Es regnet."]


def test_parallel_files_by_prefix_and_by_source_file(tmp_path):
    _write(tmp_path / "train.de.gz", ["a", "b"], compress=True)
    _write(tmp_path / "train.en.gz", ["A", "B"], compress=True)
    _write(tmp_path / "dev.de", ["c"], compress=False)
    _write(tmp_path / "dev.en", ["C"], compress=False)
    expected = (tmp_path / "train.de.gz", tmp_path / "train.en.gz")
    assert _common.parallel_files(str(tmp_path / "train"), "de", "en") == expected
    assert _common.parallel_files(str(tmp_path / "train.de.gz"), "de", "en") == expected
    assert _common.parallel_files(str(tmp_path / "dev"), "de", "en") == (tmp_path / "dev.de", tmp_path / "dev.en")
    ds = _common.load_parallel_file(str(tmp_path / "train"), "de", "en")
    assert ds["translation"] == [{"de": "a", "en": "A"}, {"de": "b", "en": "B"}]
    with pytest.raises(FileNotFoundError, match="missing.de"):
        _common.parallel_files(str(tmp_path / "missing"), "de", "en")


def test_parallel_files_must_be_line_aligned(tmp_path):
    _write(tmp_path / "x.de", ["a", "b"], compress=False)
    _write(tmp_path / "x.en", ["A"], compress=False)
    with pytest.raises(ValueError, match="2 lines .* 1"):
        _common.load_parallel_file(str(tmp_path / "x"), "de", "en")


def test_embedded_corpus_is_aligned_and_disjoint():
    splits = {}
    for name, size in [("train", 1000), ("valid", 60), ("test", 64)]:
        ds = _common.load_parallel_file(str(_common.EMBEDDED_DATA / name), "de", "en")
        assert len(ds) == size
        splits[name] = {pair["de"] for pair in ds["translation"]}
        assert all(pair["de"].strip() and pair["en"].strip() for pair in ds["translation"])
    assert not splits["train"] & splits["valid"] and not splits["train"] & splits["test"]
    assert not splits["valid"] & splits["test"]


@pytest.mark.skipif(not (SHARED / "multi30k").is_dir(), reason="../shared/data/multi30k not available")
def test_multi30k_gz_pairs_load():
    ds = _common.load_parallel_file(str(SHARED / "multi30k" / "val"), "de", "en")
    assert len(ds) == 1014
    assert ds[0]["translation"]["de"] and ds[0]["translation"]["en"]


def test_load_splits_from_a_dataset_repository_folder(tmp_path):
    """``--dataset_name`` goes through ``datasets.load_dataset``: a local folder stands in for a hub repository."""
    from datasets import Dataset

    for split, n in [("train", 5), ("validation", 3), ("test", 2)]:
        rows = [{"de": f"{split} {i}", "en": f"{split.upper()} {i}"} for i in range(n)]
        Dataset.from_dict({"translation": rows}).to_json(tmp_path / f"{split}.jsonl")
    args = de_en.TranslationArguments(dataset_name=str(tmp_path), max_train_samples=4, max_eval_samples=10)
    raw = _common.load_splits(args, load_file=_common.load_text_file, defaults={})
    assert {split: len(ds) for split, ds in raw.items()} == {"train": 4, "validation": 3, "test": 2}
    assert raw["train"][3]["translation"] == {"de": "train 3", "en": "TRAIN 3"}


def test_recipe_arguments_are_validated():
    with pytest.raises(ValueError, match="--acr_eps"):
        de_en.TranslationArguments(acr_eps=-1.0)
    with pytest.raises(ValueError, match="--acr_alpha"):
        lm.LMArguments(acr_alpha=1.5)
    with pytest.raises(ValueError, match="--corruption_eval_eps"):
        lm.LMArguments(corruption_eval_eps=[0.1, 0.0])
    with pytest.raises(ValueError, match="not both"):
        lm.LMArguments(dataset_name="wikitext", train_file="x.txt")


# -- model card ----------------------------------------------------------------------------------


def test_model_card_parses_with_clean_and_corrupted_results(tmp_path):
    acr = {"eps": 0.05, "p": 2.0, "alpha": 0.5, "n": None}
    path = write_model_card(
        tmp_path,
        model_name="tiny-de-en",
        task_type="translation",
        metric_type="bleu",
        metric_name="BLEU",
        results=[(0.0, 21.5), (0.1, 17.25), (1.0, 3.0)],
        dataset_name="wmt16",
        dataset_type="wmt16",
        dataset_config="de-en",
        hub_datasets=["wmt16"],
        acr=acr,
        language=["de", "en"],
        base_model="Helsinki-NLP/opus-mt-de-en",
        training={"learning_rate": 2e-5},
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.datasets == ["wmt16"] and data.base_model == "Helsinki-NLP/opus-mt-de-en"
    assert {"acr-optim", "acr", "translation"} <= set(data.tags)
    results = data.eval_results
    assert [r.metric_value for r in results] == [21.5, 17.25, 3.0]
    assert [r.metric_config for r in results] == [
        None,
        "gradient-corruption p=2 n=all eps=0.1",
        "gradient-corruption p=2 n=all eps=1",
    ]
    assert {(r.task_type, r.dataset_type, r.dataset_config, r.metric_type) for r in results} == {
        ("translation", "wmt16", "de-en", "bleu")
    }
    assert "| clean | 21.50 |\n| 0.1 | 17.25 |\n| 1 | 3.00 |" in card.text
    assert "| `alpha` (weight of the corrupted loss) | 0.5 |" in card.text
    assert "A Study of Parameter Corruption" in card.text and "Sun, Xu" in card.text


def test_model_card_rejects_results_without_clean_row(tmp_path):
    with pytest.raises(ValueError, match="clean"):
        write_model_card(
            tmp_path,
            model_name="m",
            task_type="translation",
            metric_type="bleu",
            metric_name="BLEU",
            results=[(0.1, 1.0)],
            dataset_name="d",
            dataset_type="local",
        )


# -- the recipes, end to end ---------------------------------------------------------------------


def _card_and_results(output_dir: Path) -> tuple[ModelCard, dict]:
    results = json.loads((output_dir / "all_results.json").read_text())
    return ModelCard.load(output_dir / "README.md"), results


def test_de_en_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "de_en"
    metrics = de_en.main(
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "8",
            "--max_predict_samples",
            "8",
            "--tokenizer_vocab_size",
            "300",
            "--generation_max_length",
            "8",
            "--corruption_eval_eps",
            "0.1",
            "2.0",
            "--acr_eps",
            "0.1",
        ]
    )
    card, results = _card_and_results(out)
    rows = results["robustness"]["rows"]
    assert [row["eps"] for row in rows] == [0.0, 0.1, 2.0]
    assert [row["bleu"] for row in rows] == [
        results["eval_bleu"],
        results["eval_corrupted_eps_0.1_bleu"],
        results["eval_corrupted_eps_2_bleu"],
    ]
    assert results["eval_corrupted_eps_2_loss"] > results["eval_corrupted_eps_0.1_loss"] > results["eval_loss"]
    assert results["eval_corrupted_eps_2_loss_increase"] > 0
    assert "test_bleu" in results and metrics["eval_bleu"] == results["eval_bleu"]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all("acr/loss_gap" in entry for entry in log if "loss" in entry)
    assert [r.metric_value for r in card.data.eval_results] == [row["bleu"] for row in rows]
    assert "acr" in card.data.tags and card.data.language == ["de", "en"]
    printed = capsys.readouterr().out
    assert "Under gradient-based parameter corruption (L2 norm eps, all parameters)" in printed
    assert "eps = 2" in printed and "loss increase" in printed
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_lm_recipe_end_to_end_baseline(tmp_path):
    out = tmp_path / "lm"
    lm.main(
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--max_train_samples",
            "200",
            "--block_size",
            "32",
            "--tokenizer_vocab_size",
            "400",
            "--corruption_eval_eps",
            "0.5",
            "--no_acr",
        ]
    )
    card, results = _card_and_results(out)
    assert results["eval_perplexity"] == math.exp(results["eval_loss"])
    assert results["eval_corrupted_eps_0.5_perplexity"] == math.exp(results["eval_corrupted_eps_0.5_loss"])
    assert results["test_perplexity"] == math.exp(results["test_loss"])
    assert [row["perplexity"] for row in results["robustness"]["rows"]] == [
        results["eval_perplexity"],
        results["eval_corrupted_eps_0.5_perplexity"],
    ]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert not any(key.startswith("acr/") for entry in log for key in entry)
    assert "baseline" in card.data.tags and card.data.eval_results[0].metric_type == "perplexity"


@pytest.mark.skipif(not (SHARED / "wikitext-2").is_dir(), reason="../shared/data/wikitext-2 not available")
def test_lm_recipe_reads_gzipped_wikitext(tmp_path):
    out = tmp_path / "wt"
    lm.main(
        [
            "--output_dir",
            str(out),
            "--train_file",
            str(SHARED / "wikitext-2" / "valid.txt.gz"),
            "--max_train_samples",
            "300",
            "--max_steps",
            "2",
            "--block_size",
            "32",
            "--tokenizer_vocab_size",
            "400",
            "--corruption_eval_eps",
            "0.5",
        ]
    )
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_perplexity"] == math.exp(results["eval_loss"])


def test_de_en_gradient_accumulation_keeps_the_loss_scale(tmp_path):
    # 2 micro-batches of 4 must log the same training loss as 1 batch of 8 (Marian ignores num_items_in_batch).
    common = ["--max_steps", "1", "--logging_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "4",
              "--max_predict_samples", "4", "--tokenizer_vocab_size", "300", "--generation_max_length", "4",
              "--corruption_eval_eps", "0.1", "--no_acr"]  # fmt: skip
    losses = []
    for batch, accumulation in [(8, 1), (4, 2)]:
        out = tmp_path / f"b{batch}"
        de_en.main([*common, "--output_dir", str(out), "--per_device_train_batch_size", str(batch),
                    "--gradient_accumulation_steps", str(accumulation)])  # fmt: skip
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses.append(next(h["loss"] for h in history if "loss" in h))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
