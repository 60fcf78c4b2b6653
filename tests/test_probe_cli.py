"""ProbeTable files/figures and the acr-probe CLI end to end on tiny saved models and local data."""

from __future__ import annotations

import csv
import gzip
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tiny_models import tiny_bert_config, tiny_marian_config

from acr_optim.cli.probe import build_parser, main
from acr_optim.probe import ProbeTable

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "big", "small", "red", "blue"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sentences(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=gen).tolist()) for _ in range(n)]


def _tokenizer(path):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_cli_causal_lm_end_to_end(gpt2_dir, tmp_path):
    data = tmp_path / "train.txt.gz"
    with gzip.open(data, "wt") as f:
        f.write("\n".join(_sentences(40, 0)) + "\n")
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(gpt2_dir),
            "--task",
            "causal-lm",
            "--data",
            str(data),
            "--max-samples",
            "6",
            "--max-length",
            "16",
            "--batch-size",
            "4",
            "--eps",
            "0.01",
            "0.1",
            "--n",
            "all",
            "20",
            "--trials",
            "2",
            "--by",
            "layer",
            "--output-dir",
            str(out),
            "--save-corruptions",
            "--no-progress",
        ]
    )
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "probe.csv",
        "probe.md",
        "report.json",
        "heatmap_gradient.png",
        "heatmap_random.png",
        "curve.png",
        "corruptions.safetensors",
    }
    for png in ("heatmap_gradient.png", "heatmap_random.png", "curve.png"):
        assert (out / png).read_bytes()[:8] == PNG
    with open(out / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = ["all", "wte", "wpe", "h.0", "h.1", "ln_f"]
    assert len(rows) == len(groups) * 2 * 2 * 2
    assert [r["group"] for r in rows[::8]] == groups
    assert {r["model"] for r in rows} == {str(gpt2_dir)} and {r["task"] for r in rows} == {"causal-lm"}
    assert {r["n"] for r in rows} == {"", "20"}
    first = rows[0]
    assert float(first["perplexity"]) > float(first["perplexity_clean"]) > 1
    assert float(first["delta_loss"]) == pytest.approx(float(first["loss"]) - float(first["loss_clean"]))
    report = ProbeTable.from_json(out / "report.json")
    assert report.config["num_examples"] == 6 and report.config["num_tokens"] == 96
    assert report.config["eps"] == [0.01, 0.1] and report.config["n"] == [None, 20]
    assert len(report.rows) == len(rows)
    loaded = safetensors_torch.load_file(out / "corruptions.safetensors")
    a = {k.rsplit("/", 1)[1]: v for k, v in loaded.items() if k.startswith("h.0/gradient/eps=0.1/n=20/")}
    assert sum(int(t.count_nonzero()) for t in a.values()) == 20
    assert torch.linalg.vector_norm(torch.cat([t.flatten() for t in a.values()])).item() == pytest.approx(0.1)
    assert "| group | num_params | method |" in (out / "probe.md").read_text()


def test_cli_seq2seq_parallel_text_and_classification_saved_dataset(tmp_path):
    tok = _tokenizer(tmp_path / "marian")
    torch.manual_seed(0)
    marian = transformers.MarianMTModel(
        tiny_marian_config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )
    marian.save_pretrained(tmp_path / "marian")
    (tmp_path / "src.txt").write_text("\n".join(_sentences(8, 1)) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(_sentences(8, 2)) + "\n")
    assert (
        main(
            [
                "--model",
                str(tmp_path / "marian"),
                "--task",
                "seq2seq",
                "--data",
                str(tmp_path / "src.txt"),
                "--target-data",
                str(tmp_path / "tgt.txt"),
                "--eps",
                "0.1",
                "--methods",
                "gradient",
                "pgd",
                "--steps",
                "2",
                "--output-dir",
                str(tmp_path / "s2s"),
                "--no-progress",
            ]
        )
        == 0
    )
    s2s = json.loads((tmp_path / "s2s" / "report.json").read_text())
    assert {r["group"] for r in s2s["rows"]} == {"all", "embedding", "attention", "norm", "feed_forward"}
    for grad, pgd in zip(
        [r for r in s2s["rows"] if r["method"] == "gradient"], [r for r in s2s["rows"] if r["method"] == "pgd"]
    ):
        assert pgd["group"] == grad["group"] and pgd["delta_loss"] >= grad["delta_loss"]
    assert "token_accuracy" in s2s["rows"][0] and s2s["config"]["num_examples"] == 8

    tok = _tokenizer(tmp_path / "bert")
    bert = transformers.BertForSequenceClassification(tiny_bert_config(vocab_size=len(tok), num_labels=2))
    bert.save_pretrained(tmp_path / "bert")
    enc = tok(_sentences(10, 3))
    datasets.Dataset.from_dict({**enc, "label": [i % 2 for i in range(10)]}).save_to_disk(tmp_path / "tokenised")
    assert (
        main(
            [
                "--model",
                str(tmp_path / "bert"),
                "--task",
                "classification",
                "--data",
                str(tmp_path / "tokenised"),
                "--eps",
                "0.5",
                "--methods",
                "random",
                "--trials",
                "3",
                "--group-regex",
                r"attention=attn",
                "--group-regex",
                r"classifier=head",
                "--output-dir",
                str(tmp_path / "cls"),
                "--no-progress",
            ]
        )
        == 0
    )
    cls = ProbeTable.from_json(tmp_path / "cls" / "report.json")
    assert [r["group"] for r in cls.rows] == ["all", "attn", "head"] and cls.config["by"] == "custom"
    assert all(r["trials"] == 3 and 0 <= r["accuracy"] <= 1 for r in cls.rows)


def test_cli_help_documents_every_option_and_rejects_bad_values(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--trust-remote-code", "--eps", "--n", "--methods", "--by", "--save-corruptions", "--target-data"):
        assert flag in text
    # defaults are shown where they say something: not on required options, unset ones or off switches
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: 0.5)" in text
    with pytest.raises(SystemExit):
        main(["--model", "m", "--task", "causal-lm", "--data", "d", "--output-dir", "o", "--n", "0"])
    assert "n must be a positive int or 'all'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--task", "causal-lm", "--data", "d", "--output-dir", "o", "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_table_formats_and_figures(tmp_path):
    rows = [
        {
            "group": g,
            "num_params": 3,
            "method": m,
            "eps": e,
            "p": 2.0,
            "n": None,
            "trials": 1,
            "loss_clean": 1.0,
            "loss": 1.0 + d,
            "delta_loss": d,
            "delta_loss_std": 0.0,
            "delta_loss_max": d,
            "first_order": d,
            "norm": e,
            "l0": 3,
        }
        for g in ("all", "norm")
        for m in ("gradient", "random")
        for e, d in ((0.1, 0.5), (1.0, 2.0))
    ]
    table = ProbeTable(rows=rows, config={"model": "tiny", "eps": [0.1, 1.0], "p": 2.0, "seed": 0})
    assert table.select(group="norm", method="random", eps=1.0) == [rows[7]]
    table.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert read[0]["model"] == "tiny" and read[0]["seed"] == "0" and read[0]["n"] == "" and "eps" in read[0]
    assert float(read[3]["delta_loss"]) == 2.0
    table.to_json(tmp_path / "t.json")
    back = ProbeTable.from_json(tmp_path / "t.json")
    assert back.rows == rows and back.config == table.config
    md = table.to_markdown(columns=["group", "method", "eps", "n", "delta_loss"])
    assert "- **eps**: 0.1, 1" in md and "| all | gradient | 0.1 | all | 0.5 |" in md
    table.heatmap(tmp_path / "h.png", method="random")
    table.curve(tmp_path / "c.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG and (tmp_path / "c.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no rows with method='pgd'"):
        table.heatmap(tmp_path / "x.png", method="pgd")


def test_reloaded_marian_keeps_its_sinusoidal_positions_frozen(tmp_path):
    # transformers 5 reloads Marian's fixed position tables as trainable; ACR and the probes would corrupt them.
    from acr_optim.integrations.models import refreeze_fixed_parameters

    transformers.MarianMTModel(
        tiny_marian_config(vocab_size=50, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).save_pretrained(tmp_path)
    model = transformers.MarianMTModel.from_pretrained(tmp_path)
    positions = ["model.decoder.embed_positions.weight", "model.encoder.embed_positions.weight"]
    reloaded_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(refreeze_fixed_parameters(model)) == reloaded_trainable & set(positions)
    assert not any(p.requires_grad for name, p in model.named_parameters() if name in positions)
    assert all(p.requires_grad for name, p in model.named_parameters() if name not in positions)


# -- what a new user runs into --------------------------------------------------------------------


def _cli(*args, env=None, cwd=None):
    """Run ``acr-probe`` in a subprocess, as a user does; returns (exit code, stdout, stderr)."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "acr_optim.cli.probe", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
        cwd=cwd,
    )
    messages = [line for line in result.stderr.splitlines() if line.strip() and "/s]" not in line]  # no bars
    return result.returncode, result.stdout, "\n".join(messages)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("marian")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    config = tiny_marian_config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.MarianMTModel(config).save_pretrained(path)
    return path


def _write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def test_task_comes_from_the_config_and_a_contradicting_task_is_refused(marian_dir, tmp_path):
    _write_gz(tmp_path / "val.de.gz", _sentences(6, 4))
    _write_gz(tmp_path / "val.en.gz", _sentences(6, 5))
    code, out, err = _cli(
        "--model", marian_dir, "--task", "causal-lm", "--data", tmp_path / "val.de.gz", "--output-dir", tmp_path / "o"
    )
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"acr-probe: error: --task causal-lm contradicts --model {marian_dir}, a seq2seq model (MarianMTModel)"
    ]
    assert not (tmp_path / "o").exists()
    # no --task: seq2seq from the config; the line-aligned .de.gz finds its .en.gz partner
    argv = ["--model", str(marian_dir), "--data", str(tmp_path / "val.de.gz"), "--eps", "0.1", "--no-progress"]
    assert main([*argv, "--methods", "gradient", "--output-dir", str(tmp_path / "s2s")]) == 0
    report = ProbeTable.from_json(tmp_path / "s2s" / "report.json")
    assert report.config["task"] == "seq2seq" and report.config["num_examples"] == 6
    assert report.config["files"] == [str(tmp_path / "val.de.gz"), str(tmp_path / "val.en.gz")]
    assert "split" not in report.config
    # by prefix, with the languages named: the same pairs, so the same numbers
    prefix = ["--data", str(tmp_path / "val"), "--source-lang", "de", "--target-lang", "en"]
    assert main([*argv[:2], *prefix, *argv[4:], "--methods", "gradient", "--output-dir", str(tmp_path / "p")]) == 0
    assert ProbeTable.from_json(tmp_path / "p" / "report.json").rows == report.rows


def test_a_load_that_leaves_weights_newly_initialised_is_refused(tmp_path):
    tok = _tokenizer(tmp_path / "bert")
    transformers.BertModel(tiny_bert_config(vocab_size=len(tok))).save_pretrained(tmp_path / "bert")  # no head
    (tmp_path / "x.txt").write_text("\n".join(_sentences(4, 0)) + "\n")
    common = ["--data", str(tmp_path / "x.txt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    code, _, err = _cli("--model", tmp_path / "bert", *common)
    assert code == 2 and err.strip().splitlines() == [
        f"acr-probe: error: --model {tmp_path / 'bert'}: cannot tell its task from the config (BertModel); pass --task"
    ]
    code, _, err = _cli("--model", tmp_path / "bert", "--task", "classification", *common)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "leaves 2 weight(s) newly initialised (classifier.bias, classifier.weight)" in err
    assert not (tmp_path / "o").exists()


def test_mistyped_paths_fail_at_once_with_one_line(marian_dir, tmp_path):
    (tmp_path / "outputs").mkdir()
    data = tmp_path / "x.txt"
    data.write_text("a b\n")
    cases = [
        (["--model", tmp_path / "outputs" / "de_en", "--data", data], "--model {}: no such file or folder"),
        (["--model", "outputs/de_en", "--data", data], "--model outputs/de_en: no such file or folder"),
        (["--model", marian_dir, "--data", tmp_path / "missing.de.gz"], "--data {}: no such file or folder"),
        (["--model", marian_dir, "--data", "../nowhere/val"], "--data ../nowhere/val: no such file or folder"),
    ]
    for args, message in cases:
        code, _, err = _cli(*args, "--output-dir", tmp_path / "o", cwd=tmp_path)  # outputs/ exists there
        path = next((a for a in args if isinstance(a, type(tmp_path)) and not a.exists()), None)
        assert code == 2, err
        assert err.strip().splitlines() == [f"acr-probe: error: {message.format(path)}"]
    # a hub id while offline (HF_HUB_OFFLINE=1 is honoured): one line, no traceback
    code, _, err = _cli("--model", "nobody/no-such-model", "--data", data, "--output-dir", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("acr-probe: error: --model nobody/no-such-model: ")


def test_cli_fault_rows_alone_and_a_bad_spec(gpt2_dir, tmp_path, capsys):
    data = tmp_path / "x.txt"
    data.write_text("\n".join(_sentences(40, 7)) + "\n")
    out = tmp_path / "faults"
    argv = ["--model", str(gpt2_dir), "--data", str(data), "--max-samples", "4", "--max-length", "16"]
    faults = ["int8", "flip:1e-3:int8", "prune:0.5"]
    code = main([*argv, "--eps", "--faults", *faults, "--trials", "2", "--by", "layer", "--no-all"] +
                ["--save-corruptions", "--no-progress", "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "probe.csv", "probe.md", "report.json", "heatmap_faults.png", "corruptions.safetensors"
    }  # fmt: skip
    table = ProbeTable.from_json(out / "report.json")
    assert [r["method"] for r in table.rows if r["group"] == "h.0"] == faults
    assert all(r["eps"] is None for r in table.rows)
    assert {r["trials"] for r in table.select(method="flip:1e-3:int8") if r["group"] != "ln_f"} == {2}
    saved = safetensors_torch.load_file(out / "corruptions.safetensors")
    assert "h.0/fault=prune:0.5/transformer.h.0.mlp.c_fc.weight" in saved
    assert "largest loss increase" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--faults", "flip:10", "--output-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert "fault spec 'flip:10'" in err and "for 10 flips write flips:10" in err
    with pytest.raises(SystemExit):
        main([*argv, "--eps", "--output-dir", str(tmp_path / "none")])
    assert "give --eps values, --faults, or both" in capsys.readouterr().err


def test_cli_probes_a_lora_adapter_folder_as_its_merged_model(gpt2_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")  # base_model_name_or_path: gpt2_dir
    data = tmp_path / "x.txt"
    data.write_text("\n".join(_sentences(40, 3)) + "\n")
    common = ["--data", str(data), "--max-samples", "4", "--max-length", "16", "--eps", "0.1", "1", "--no-progress"]
    tables = {}
    for name, extra in [("unmerged", []), ("merged", ["--merge-adapter"])]:
        assert main(["--model", str(tmp_path / "adapter"), *common, *extra, "--output-dir", str(tmp_path / name)]) == 0
        tables[name] = ProbeTable.from_json(tmp_path / name / "report.json")
    unmerged, merged = tables["unmerged"].rows, tables["merged"].rows
    assert [(r["group"], r["num_params"], r["method"], r["eps"]) for r in unmerged] == [
        (r["group"], r["num_params"], r["method"], r["eps"]) for r in merged
    ]
    for u, m in zip(unmerged, merged):
        assert u["delta_loss"] == pytest.approx(m["delta_loss"], rel=1e-4, abs=1e-6)
    # the adapter changes the model: the merged model is not the base model
    assert main(["--model", str(gpt2_dir), *common, "--output-dir", str(tmp_path / "base")]) == 0
    assert ProbeTable.from_json(tmp_path / "base" / "report.json").rows[0]["loss_clean"] != merged[0]["loss_clean"]


def test_a_hub_name_goes_to_the_hub_and_a_prefix_to_the_pair(tmp_path, monkeypatch):
    import acr_optim.cli.probe as cli

    rows = datasets.Dataset.from_dict({"translation": [{"de": "ein hund", "en": "a dog"}]})
    asked = []
    monkeypatch.setattr(cli, "load_data", lambda spec, **kw: asked.append((spec, kw)) or (rows, {"dataset": spec[0]}))
    args = build_parser().parse_args(["--model", "m", "--data", "wmt16", "--data-config", "de-en", "--output-dir", "o"])
    args.source_lang, args.target_lang = "de", "en"
    assert cli._load_rows(args, "seq2seq") == (rows, {"dataset": "wmt16"})
    assert asked == [(["wmt16"], {"split": None, "config": "de-en"})]
    _write_gz(tmp_path / "v.de.gz", ["ein hund"])
    _write_gz(tmp_path / "v.en.gz", ["a dog"])
    args.data = [str(tmp_path / "v")]
    pairs, source = cli._load_rows(args, "seq2seq")
    assert pairs["translation"] == rows["translation"] and source == {
        "files": [str(tmp_path / f"v.{x}.gz") for x in ["de", "en"]]
    }
    assert len(asked) == 1
