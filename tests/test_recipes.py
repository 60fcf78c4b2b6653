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
from transformers import Seq2SeqTrainingArguments, TrainingArguments

from acr_optim.data import load_parallel
from acr_optim.errors import UsageError
from acr_optim.hub import write_model_card

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
sys.path.insert(0, str(RECIPES))

import _common
import de_en
import lm


def _write(path: Path, lines: list[str], compress: bool = False) -> None:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if compress else text)


# -- data loading (the files themselves: tests/test_data.py) ------------------------------------


def test_embedded_corpus_is_aligned_and_disjoint():
    splits = {}
    for name, size in [("train", 1000), ("valid", 60), ("test", 64)]:
        ds = load_parallel(str(_common.EMBEDDED_DATA / name), "de", "en")
        assert len(ds) == size
        splits[name] = {pair["de"] for pair in ds["translation"]}
        assert all(pair["de"].strip() and pair["en"].strip() for pair in ds["translation"])
    assert not splits["train"] & splits["valid"] and not splits["train"] & splits["test"]
    assert not splits["valid"] & splits["test"]


@pytest.mark.skipif(not (SHARED / "multi30k").is_dir(), reason="../shared/data/multi30k not available")
def test_multi30k_gz_pairs_load():
    ds = load_parallel(str(SHARED / "multi30k" / "val"), "de", "en")
    assert len(ds) == 1014
    assert ds[0]["translation"]["de"] and ds[0]["translation"]["en"]


def test_load_splits_from_a_dataset_repository_folder(tmp_path):
    """``--dataset_name`` goes through ``datasets.load_dataset``: a local folder stands in for a hub repository."""
    from datasets import Dataset

    for split, n in [("train", 5), ("validation", 3), ("test", 2)]:
        rows = [{"de": f"{split} {i}", "en": f"{split.upper()} {i}"} for i in range(n)]
        Dataset.from_dict({"translation": rows}).to_json(tmp_path / f"{split}.jsonl")
    args = de_en.TranslationArguments(dataset_name=str(tmp_path), max_train_samples=4, max_eval_samples=10)
    raw = _common.load_splits(args, load_file=_common.load_text_file, defaults={}, seed=0)
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


def _help(recipe, monkeypatch, capsys) -> dict[str, dict[str, str]]:
    """``recipe.main(["--help"])`` as ``{section title: {option: its help text}}``, in the order printed."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps to $COLUMNS: one line an option's help
    with pytest.raises(SystemExit) as caught:
        recipe.main(["--help"])
    assert caught.value.code == 0
    sections, section, option = {}, None, None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            section = sections.setdefault(line[:-1], {})
        elif section is not None and line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            section[option] = line.split("  ", 2)[-1].strip() if "  " in line.strip() else ""
        elif section is not None and line.startswith("   "):
            section[option] = f"{section[option]} {line.strip()}".strip()
    return sections


@pytest.mark.parametrize("recipe", [de_en, lm])
def test_help_shows_the_defaults_the_recipe_applies(recipe, monkeypatch, capsys):
    options = _help(recipe, monkeypatch, capsys)["options"]
    for option, value in recipe.DEFAULTS.items():
        assert options[f"--{option}"].endswith(f"(default: {value})")
    assert recipe.DEFAULTS["learning_rate"] == 0.002 and options["--learning_rate"].endswith("(default: 0.002)")
    # and those are the values the recipe runs with
    args_type = de_en.TranslationArguments if recipe is de_en else lm.LMArguments
    training_type = Seq2SeqTrainingArguments if recipe is de_en else TrainingArguments
    args, training_args = _common.parse_arguments(args_type, training_type, recipe.DEFAULTS, [], "")
    ran = {option: getattr(training_args, option) for option in recipe.DEFAULTS}
    assert ran == recipe.DEFAULTS | {"report_to": []}  # TrainingArguments turns "none" into no integration
    assert args == args_type()


def test_help_gives_the_recipes_own_options_titled_sections(monkeypatch, capsys):
    expected = {
        "model (default: the recipe's tiny model, trained from scratch)": [
            "--model_name_or_path", "--model_config", "--tokenizer_name", "--tokenizer_vocab_size",
            "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules"],
        "data (default: the recipe's own, see its docstring)": [
            "--dataset_name", "--dataset_config_name", "--train_file", "--validation_file", "--test_file",
            "--max_train_samples", "--max_eval_samples", "--max_predict_samples", "--validation_split_percentage"],
        ("ACR (training minimises (1 - alpha) L(w) + alpha L(w + a), a the worst corruption with "
         "||a||_p = eps, or drawn from the error set of --acr_fault)"): [
            "--acr_eps", "--acr_p", "--acr_alpha", "--acr_n", "--acr_fault", "--acr_fault_mode", "--acr_fault_radius",
            "--no_acr"],
        ("robustness evaluation of the final model (validation set): gradient-based corruption and real-world "
         "faults"): ["--corruption_eval_eps", "--corruption_eval_p", "--corruption_eval_n", "--corruption_eval_faults"],
    }  # fmt: skip
    own = {
        de_en: {"translation": ["--source_lang", "--target_lang", "--max_source_length", "--max_target_length"]},
        lm: {"language model": ["--block_size"]},
    }
    for recipe in (de_en, lm):
        sections = _help(recipe, monkeypatch, capsys)
        assert list(sections) == ["options", *expected, *own[recipe]]
        assert {title: list(sections[title]) for title in [*expected, *own[recipe]]} == expected | own[recipe]
        assert len(sections["options"]) > 100  # -h and transformers' (Seq2Seq)TrainingArguments
        acr = sections[next(title for title in sections if title.startswith("ACR"))]
        assert acr["--acr_eps"] == (
            "Corruption size eps >= 0; 0 corrupts nothing: the AdamW step, bit for bit. (default: 0.05)"
        )


def test_acr_eps_0_is_accepted_and_corrupts_nothing(tmp_path):
    import torch

    args, training_args = _common.parse_arguments(
        de_en.TranslationArguments, Seq2SeqTrainingArguments, {"output_dir": str(tmp_path)}, ["--acr_eps", "0"], ""
    )
    assert args.acr_eps == 0.0 and args.training_kind == "ACR (eps=0, p=2, alpha=0.5)"
    model = torch.nn.Linear(3, 2)
    (optimizer, _), _ = _common.acr_optimizer(model, args, training_args)
    model(torch.randn(4, 3)).square().sum().backward()
    assert optimizer.perturb() is False  # no corrupted pass: the AdamW step alone


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_evaluations_after_training_print_nothing(tmp_path, capsys, disable_tqdm):
    """After :func:`_common.quiet_evaluations` the Trainer prints no bar and no metrics per evaluation
    (the robustness sweep runs one per eps and fault): the recipe's own lines say what happens."""
    import torch
    from transformers import Trainer

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x, labels):
            return {"loss": (self.linear(x).squeeze(-1) - labels).square().mean()}

    rows = [{"x": torch.randn(3), "labels": torch.tensor(1.0)} for _ in range(8)]
    args = TrainingArguments(str(tmp_path), report_to="none", disable_tqdm=disable_tqdm, use_cpu=True)
    trainer = Trainer(model=Regression(), args=args, eval_dataset=rows)
    trainer.evaluate()
    out, err = capsys.readouterr()
    assert ("{'eval_loss'" in out) if disable_tqdm else ("it/s]" in err)
    _common.quiet_evaluations(trainer)
    trainer.evaluate()
    assert capsys.readouterr() == ("", "")


def test_both_recipes_hold_out_validation_rows_when_no_validation_file_is_given(tmp_path):
    from functools import partial

    _write(tmp_path / "t.de", [f"satz {i}" for i in range(40)])
    _write(tmp_path / "t.en", [f"sentence {i}" for i in range(40)])
    _write(tmp_path / "t.txt", [f"line {i}" for i in range(40)] + [""])
    loaders = [
        (de_en.TranslationArguments(train_file=str(tmp_path / "t"), validation_split_percentage=10),
         partial(load_parallel, source_lang="de", target_lang="en")),
        (lm.LMArguments(train_file=str(tmp_path / "t.txt"), validation_split_percentage=10), _common.load_text_file),
    ]  # fmt: skip
    for args, load_file in loaders:
        raw = _common.load_splits(args, load_file, defaults={}, seed=0)
        assert {split: len(rows) for split, rows in raw.items()} == {"train": 36, "validation": 4}
        again = _common.load_splits(args, load_file, defaults={}, seed=0)
        assert again["validation"].to_list() == raw["validation"].to_list()  # the same rows for the same seed
    with pytest.raises(ValueError, match=r"--validation_split_percentage must be in \[1, 50\], got 0"):
        lm.LMArguments(validation_split_percentage=0)


def test_user_errors_in_the_recipes_name_the_flag_and_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    _write(tmp_path / "blank.txt", ["", "  "])
    _write(tmp_path / "short.txt", ["one two three"])
    _write(tmp_path / "x.de", ["a"])
    cases = [
        (lm, ["--train_file", "empty.txt"], "--train_file empty.txt: the file is empty"),
        (lm, ["--train_file", "blank.txt"], "--train_file blank.txt: only empty lines"),
        (lm, ["--train_file", "short.txt", "--validation_file", "short.txt"],
         "--train_file short.txt: shorter than one block of 64 tokens; lower --block_size"),
        (de_en, ["--train_file", "x.de"], "--train_file x.de: no target file x.en[.gz] next to it"),
        (de_en, ["--train_file", "./nowhere/train"], "--train_file ./nowhere/train: no such file or folder"),
        (de_en, ["--train_file", "nowhere"], ("--train_file nowhere: no such file; expected nowhere.de[.gz] and "
         "nowhere.en[.gz], a source file ending in .de[.gz], or a .json/.jsonl file")),
        (de_en, ["--model_name_or_path", "./my-model"], "--model_name_or_path ./my-model: no such file or folder"),
        (de_en, ["--acr_alpha", "2"], "--acr_alpha must satisfy 0 <= --acr_alpha <= 1, got 2.0"),
        (de_en, ["--acr_eps", "-0.1"], "--acr_eps must be finite and >= 0, got -0.1"),
        (lm, ["--lora_r", "2", "--corruption_eval_faults", "int8"], ("--corruption_eval_faults with --lora_r: faults "
         "act on the merged weights, not on the adapters; probe the saved adapter instead (acr-probe --model "
         "OUTPUT_DIR --faults ...)")),
    ]  # fmt: skip
    for recipe, argv, message in cases:
        with pytest.raises(UsageError) as caught:
            recipe.main([*argv, "--output_dir", str(tmp_path / "out")])
        assert str(caught.value) == message


def _recipe(tmp_path, *argv, launcher=()):
    """Run a recipe as a user does, in a subprocess; returns (exit code, the lines on stderr that are not bars)."""
    import os
    import subprocess

    result = subprocess.run(
        [*launcher, *([] if launcher else [sys.executable]), *map(str, argv)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    # what the recipe itself says (an installed torchao can make transformers' imports print lines of their own)
    return result.returncode, [line for line in result.stderr.splitlines() if ": error: " in line]


def test_a_user_error_is_one_line_on_the_command_line_and_under_accelerate_launch(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, errors = _recipe(tmp_path, RECIPES / "lm.py", "--train_file", "empty.txt")
    assert (code, errors) == (2, ["lm.py: error: --train_file empty.txt: the file is empty"])
    # `make demo`'s launcher: no CalledProcessError traceback, just the line
    launcher = [Path(sys.executable).parent / "accelerate", "launch", "-q", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    code, errors = _recipe(tmp_path, RECIPES / "de_en.py", "--acr_alpha", "2", launcher=launcher)
    assert code != 0 and errors == ["de_en.py: error: --acr_alpha must satisfy 0 <= --acr_alpha <= 1, got 2.0"]


# -- model card ----------------------------------------------------------------------------------


def test_model_card_parses_with_clean_and_corrupted_results(tmp_path):
    acr = {"eps": 0.05, "p": 2.0, "alpha": 0.5, "n": None}
    path = write_model_card(
        tmp_path,
        model_name="tiny-de-en",
        task_type="translation",
        metric_type="bleu",
        metric_name="BLEU",
        results=[(0.0, 21.5, 0.0), (0.1, 17.25, 0.123456), (1.0, 3.0, 2.5)],
        test_result=20.123456,
        usage='print("hello")',
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
    assert [r.metric_value for r in results] == [21.5, 17.25, 3.0, 20.12]  # 4 significant digits
    assert [(r.dataset_split, r.metric_name) for r in results[::3]] == [("validation", "BLEU"), ("test", "BLEU (test)")]
    assert [r.metric_config for r in results] == [
        None,
        "gradient-corruption p=2 n=all eps=0.1",
        "gradient-corruption p=2 n=all eps=1",
        None,
    ]
    assert {(r.task_type, r.dataset_type, r.dataset_config, r.metric_type) for r in results} == {
        ("translation", "wmt16", "de-en", "bleu")
    }
    assert "| clean | 21.50 | 0.000 |\n| 0.1 | 17.25 | 0.123 |\n| 1 | 3.00 | 2.500 |" in card.text
    assert "scores **20.12 BLEU**" in card.text and '## How to use\n\n```python\nprint("hello")\n```' in card.text
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
            results=[(0.1, 1.0, 0.5)],
            dataset_name="d",
            dataset_type="local",
        )


# -- the recipes, end to end ---------------------------------------------------------------------


def _card_and_results(output_dir: Path) -> tuple[ModelCard, dict]:
    results = json.loads((output_dir / "all_results.json").read_text())
    return ModelCard.load(output_dir / "README.md"), results


def test_de_en_recipe_end_to_end(tmp_path, capsys, monkeypatch):
    import torch

    gradient_passes = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: gradient_passes.append(1) or grad(*a, **k))
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
            "--corruption_eval_faults",
            "int8",
            "prune:0.5",
        ]
    )
    card, results = _card_and_results(out)
    rows = results["robustness"]["rows"]
    faults = results["robustness"]["faults"]
    assert [(f["fault"], f["label"]) for f in faults] == [
        ("int8", "int8 weights, per channel"),
        ("prune:0.5", "50% magnitude pruning"),
    ]
    assert [f["bleu"] for f in faults] == [results["eval_fault_int8_bleu"], results["eval_fault_prune:0.5_bleu"]]
    assert results["eval_fault_prune:0.5_loss_increase"] > results["eval_fault_int8_loss_increase"]
    assert results["eval_fault_prune:0.5_norm_inf"] > 0 and results["eval_fault_int8_broken"] == 0
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
    validation = [r.metric_value for r in card.data.eval_results if r.dataset_split == "validation"]
    assert validation == [
        float(f"{value:.4g}") for value in [row["bleu"] for row in rows] + [f["bleu"] for f in faults]
    ]
    names = [r.metric_name for r in card.data.eval_results if r.dataset_split == "validation"]
    assert names[-2:] == ["BLEU (int8 weights, per channel)", "BLEU (50% magnitude pruning)"]
    assert "acr" in card.data.tags and card.data.language == ["de", "en"]
    printed = capsys.readouterr().out
    assert "***** eval metrics *****" not in printed  # the summary shows them; eval_results.json holds them all
    assert json.loads((out / "robustness_results.json").read_text()) == {"robustness": results["robustness"]}
    assert "robustness" not in json.loads((out / "eval_results.json").read_text())
    # the saved model decodes as the recipe scored it (acr-probe --metric bleu takes these defaults)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_length"]) == (4, 8)  # the default beams, --generation_max_length 8
    assert "Under gradient-based parameter corruption (L2 norm eps, all parameters)" in printed
    assert "eps = 2" in printed and "loss increase" in printed
    assert "Under real-world faults of the weights:" in printed and "50% magnitude pruning" in printed
    # one gradient (one pass over the single validation batch) for the whole sweep, a line per evaluation
    assert len(gradient_passes) == 1
    lines = [line.split(":")[0] for line in printed.splitlines() if line.startswith("evaluation ")]
    assert lines == [
        "evaluation 1/5 (clean)",
        "evaluation 2/5 (eps 0.1)",
        "evaluation 3/5 (eps 2)",
        "evaluation 4/5 (int8)",
        "evaluation 5/5 (prune",
    ]
    increase = results["eval_corrupted_eps_2_loss_increase"]
    # the tokenizer is written once, next to the model
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "tokenizer").exists()
    # the card: true step and epoch counts, test score, loss increases, a usage snippet that runs
    training = dict(line.strip("| ").split(" | ") for line in card.text.splitlines() if line.startswith("| `"))
    assert training["`optimizer_steps`"] == "3" and float(training["`epochs`"]) < 10
    assert "num_train_epochs" not in card.text
    (test,) = [r for r in card.data.eval_results if r.dataset_split == "test"]
    assert test.metric_value == float(f"{results['test_bleu']:.4g}")
    assert f"| 2 | {results['eval_corrupted_eps_2_bleu']:.2f} | {increase:.3f} |" in card.text
    usage = card.text.split("## How to use\n\n```python\n")[1].split("```")[0]
    exec(compile(usage, "usage", "exec"), {})  # noqa: S102 - running the card's own snippet is the test
    assert "print(" in usage and capsys.readouterr().out.startswith("[")


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


def test_acr_fault_builds_acr_against_the_fault_and_bad_settings_name_the_flag(tmp_path):
    import torch

    def parse(*argv):
        return _common.parse_arguments(
            de_en.TranslationArguments, Seq2SeqTrainingArguments, {"output_dir": str(tmp_path)}, list(argv), ""
        )

    args, training_args = parse("--acr_fault", "int4:g2", "--acr_fault_mode", "actual", "--acr_alpha", "1")
    assert args.acr_config == {"fault": "int4:g2", "fault_mode": "actual", "fault_radius": 1.0, "alpha": 1.0}
    assert args.training_kind == "ACR (fault=int4:g2, actual, radius=1, alpha=1)"
    model = torch.nn.Linear(4, 2)
    (optimizer, _), _ = _common.acr_optimizer(model, args, training_args)
    assert optimizer.defaults["acr_fault"] == "int4:g2" and optimizer.defaults["acr_fault_mode"] == "actual"
    with pytest.raises(
        ValueError, match=r"^--acr_fault int8 \(--acr_fault_mode, --acr_fault_radius\): fault_mode must"
    ):
        parse("--acr_fault", "int8", "--acr_fault_mode", "best")
