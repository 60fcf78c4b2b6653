"""ProbeTable files/figures and the acr-probe CLI end to end on tiny saved models and local data."""

from __future__ import annotations

import csv
import gzip
import json
import math

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
    assert "--num-beams N, --num_beams N" in text and "--max-new-tokens N" in text


BAD_VALUES = [
    (["--eps", "-1"], "argument --eps: must be a finite number > 0, got '-1'"),
    (["--eps", "0.1", "nan"], "argument --eps: must be a finite number > 0, got 'nan'"),
    (["--eps", "inf"], "argument --eps: must be a finite number > 0, got 'inf'"),
    (["--eps", "0"], "argument --eps: must be a finite number > 0, got '0'"),
    (["--eps", "x"], "argument --eps: must be a finite number > 0, got 'x'"),
    (["--p", "0.5"], "argument --p: must be a number with 1 <= p <= inf ('inf' accepted), got '0.5'"),
    (["--n", "0"], "argument --n: must be a positive int or 'all', got '0'"),
    (["--n", "many"], "argument --n: must be a positive int or 'all', got 'many'"),
    (["--trials", "0"], "argument --trials: must be an int >= 1, got '0'"),
    (["--batch-size", "0"], "argument --batch-size: must be an int >= 1, got '0'"),
    (["--max-samples", "1.5"], "argument --max-samples: must be an int >= 1, got '1.5'"),
    (["--max-length", "-3"], "argument --max-length: must be an int >= 1, got '-3'"),
    (["--steps", "-1"], "argument --steps: must be an int >= 0, got '-1'"),
    (["--step-size", "0"], "argument --step-size: must be a finite number > 0, got '0'"),
    (["--num-beams", "0"], "argument --num-beams/--num_beams: must be an int >= 1, got '0'"),
    (["--metric", "bleu", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an int >= 1, got '0'"),
    (["--group-regex", "(=x"], "argument --group-regex: '(' is not a regular expression "
                               "(missing ), unterminated subpattern at position 0)"),  # fmt: skip
    (["--group-regex", "attn"], "argument --group-regex: takes PATTERN=GROUP, got 'attn'"),
    (["--device", "gpu"], "argument --device: 'gpu' is not a torch device (cpu, cuda, cuda:1, ...)"),
    (["--device", "cuda:7"], f"argument --device: cuda:7: this machine has {torch.cuda.device_count()} CUDA device(s)"),
    (["--dtype", "int8"], None),  # argparse's own wording, which varies with the Python version
    (["--eps"], "give --eps values, --faults, or both"),
    (["--num-beams", "4"], "--num-beams sets the decoding of --metric bleu; --metric is auto"),
    (["--metric", "token-accuracy", "--max-new-tokens", "9"],
     "--max-new-tokens sets the decoding of --metric bleu; --metric is token-accuracy"),  # fmt: skip
    (["--task", "causal-lm", "--metric", "bleu"],
     "--metric bleu needs a seq2seq model; --model ./nothing is causal-lm"),  # fmt: skip
    (["--task", "classification", "--target-data", "t.en"],
     "--target-data only applies to seq2seq models; --model ./nothing is classification"),  # fmt: skip
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_every_argument_is_checked_before_anything_loads(args, message, tmp_path, capsys, monkeypatch):
    # --model and --data name nothing: an argument that got past the checks would fail on them instead
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "./nothing", "--data", "./missing.txt", "--output-dir", "o", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("acr-probe: error: ")  # one line, not the usage summary
    if message is not None:
        assert lines[0] == f"acr-probe: error: {message}"
    assert not (tmp_path / "o").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "report").write_text("")
    with pytest.raises(SystemExit):
        main(["--model", "./nothing", "--data", "./missing.txt", "--output-dir", str(tmp_path / "report")])
    message = f"argument --output-dir: {tmp_path / 'report'} is a file, not a folder"
    assert capsys.readouterr().err == f"acr-probe: error: {message}\n"


def test_a_bad_eps_fails_at_once_in_one_line_not_a_traceback(marian_dir, tmp_path):
    (tmp_path / "x.txt").write_text("a b\n")
    code, out, err = _cli(
        "--model", marian_dir, "--data", tmp_path / "x.txt", "--output-dir", tmp_path / "o", "--eps", "-1"
    )
    assert (code, out, err) == (2, "", "acr-probe: error: argument --eps: must be a finite number > 0, got '-1'")


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
    curve = table.curve(tmp_path / "c.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG and (tmp_path / "c.png").read_bytes()[:8] == PNG
    ax = curve.axes[0]  # readable titles, axes and legends, not column names
    assert ax.get_title() == "Loss L(w+a) vs corruption size, all parameters\nany number of entries"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("eps (L2 norm of the corruption)", "loss L(w+a)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "gradient corruption (first-order worst case)",
        "random corruption",
        "clean model",
    ]
    with pytest.raises(ValueError, match="no rows with method='pgd'"):
        table.heatmap(tmp_path / "x.png", method="pgd")


def _eps_row(group, method, eps, delta, std, trials=5):
    return {
        "group": group,
        "num_params": 3,
        "method": method,
        "eps": eps,
        "p": 2.0,
        "n": None,
        "trials": trials,
        "loss_clean": 1.0,
        "loss": 1.0 + delta,
        "delta_loss": delta,
        "delta_loss_std": std,
        "delta_loss_max": delta + std,
        "first_order": delta,
        "norm": eps,
        "l0": 3,
    }


def test_method_heatmaps_share_one_colour_scale_and_leave_noise_uncoloured(tmp_path):
    from matplotlib.colors import LogNorm

    rows = [
        _eps_row("all", "gradient", 0.1, 0.02, 0.0, trials=1),
        _eps_row("all", "gradient", 1.0, 2.0, 0.0, trials=1),
        _eps_row("all", "random", 0.1, -1e-4, 3e-4),  # |mean| <= std: noise, whatever its sign
        _eps_row("all", "random", 1.0, 0.005, 0.001),
    ]
    table = ProbeTable(rows=rows, config={"p": 2.0})
    gradient = table.heatmap(tmp_path / "g.png", method="gradient")
    random = table.heatmap(tmp_path / "r.png", method="random")
    for fig in (gradient, random):  # one log scale over both methods' coloured cells, the noise left out
        norm = fig.axes[0].images[0].norm
        assert type(norm) is LogNorm and (norm.vmin, norm.vmax) == (0.005, 2.0)
        assert fig.axes[0].get_xlabel() == "eps (L2 norm of the corruption)"
        assert fig.axes[1].get_ylabel() == "loss increase L(w+a) - L(w)"  # the colour bar
    assert random.axes[0].images[0].get_array().mask.tolist() == [[True, False]]
    assert [t.get_text() for t in random.axes[0].texts] == ["-0.0001", "0.005"]
    assert [t.get_text() for t in random.legends[0].get_texts()] == [
        "noise: |mean| <= std over the draws (not coloured)"
    ]
    assert not gradient.legends and not gradient.axes[0].images[0].get_array().mask.any()
    bare = [{k: v for k, v in r.items() if k not in ("trials", "delta_loss_std")} for r in rows]  # stored records
    stored = ProbeTable(rows=bare).heatmap(tmp_path / "b.png", method="random")  # no std: nothing is noise
    assert [t.get_text() for t in stored.legends[0].get_texts()] == ["<= 0: no increase, off the log colour scale"]
    assert random.axes[0].get_title() == (
        "Loss increase L(w+a) - L(w) under random corruption, mean of 5 draws\nL2 norm eps, any number of entries"
    )
    assert gradient.axes[0].get_title() == (
        "Loss increase L(w+a) - L(w) under gradient corruption (first-order worst case)\n"
        "L2 norm eps, any number of entries"
    )
    # a significant decrease (|mean| > std) is no increase: white, off the log scale, which the positive values
    # keep; an inf cell is dark grey
    rows += [
        _eps_row("norm", "random", 0.1, -0.5, 0.01),
        _eps_row("norm", "random", 1.0, math.inf, math.nan),
        _eps_row("norm", "gradient", 0.1, 3.0, 0.0, trials=1),
        _eps_row("norm", "gradient", 1.0, 4.0, 0.0, trials=1),
    ]
    for method in ("gradient", "random"):
        linf = ProbeTable(rows=[{**r, "p": math.inf} for r in rows], config={"p": math.inf})
        fig = linf.heatmap(tmp_path / "s.png", method=method)
        norm = fig.axes[0].images[0].norm
        assert type(norm) is LogNorm and (norm.vmin, norm.vmax) == (0.005, 4.0)
        assert "L-inf norm eps" in fig.axes[0].get_title()
    assert fig.axes[0].images[0].get_array().mask.tolist() == [[True, False], [True, True]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "noise: |mean| <= std over the draws (not coloured)",
        "<= 0: no increase, off the log colour scale",
        "inf / NaN: the model broke",
    ]
    assert [t.get_text() for t in fig.axes[0].texts] == ["-0.0001", "0.005", "-0.5", "inf"]


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


def test_bleu_decodes_as_the_generation_config_or_num_beams_says_and_the_report_records_it(
    marian_dir, tmp_path, monkeypatch
):
    import shutil

    model_dir = tmp_path / "beams2"
    shutil.copytree(marian_dir, model_dir)
    generation = transformers.GenerationConfig.from_pretrained(model_dir)
    generation.num_beams = 2  # what model.generate() then uses by default
    generation.save_pretrained(model_dir)
    _write_gz(tmp_path / "val.de.gz", _sentences(4, 4))
    _write_gz(tmp_path / "val.en.gz", _sentences(4, 5))
    calls = []
    generate = transformers.MarianMTModel.generate

    def recorded(self, *args, **kwargs):
        calls.append((kwargs.get("num_beams"), kwargs["max_new_tokens"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.MarianMTModel, "generate", recorded)
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "val.de.gz"), "--metric", "bleu", "--max-length", "12"]
    argv += ["--eps", "0.1", "--methods", "gradient", "--by", "all", "--no-progress"]
    decoding = ("num_beams", "num_beams_from", "max_new_tokens")
    assert main([*argv, "--output-dir", str(tmp_path / "default")]) == 0
    config = ProbeTable.from_json(tmp_path / "default" / "report.json").config
    assert [config[k] for k in decoding] == [2, "the model's generation_config", 12]
    assert set(calls) == {(2, 12)} and len(calls) == 2  # clean, then under the corruption
    calls.clear()
    assert main([*argv, "--num_beams", "3", "--max-new-tokens", "5", "--output-dir", str(tmp_path / "given")]) == 0
    config = ProbeTable.from_json(tmp_path / "given" / "report.json").config
    assert [config[k] for k in decoding] == [3, "--num-beams", 5]
    assert set(calls) == {(3, 5)}
    with open(tmp_path / "given" / "probe.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["num_beams"], row["num_beams_from"], row["max_new_tokens"]) == ("3", "--num-beams", "5")
    assert "- **num_beams**: 3\n- **num_beams_from**: --num-beams\n- **max_new_tokens**: 5\n" in (
        tmp_path / "given" / "probe.md"
    ).read_text()
    # no decoding, no decoding settings
    assert main([*argv[:4], *argv[6:], "--output-dir", str(tmp_path / "tokens")]) == 0
    assert not set(decoding) & set(ProbeTable.from_json(tmp_path / "tokens" / "report.json").config)


def test_the_report_says_which_parameters_were_not_probed_and_why(marian_dir, tmp_path):
    _write_gz(tmp_path / "val.de.gz", _sentences(4, 4))
    _write_gz(tmp_path / "val.en.gz", _sentences(4, 5))
    argv = ["--model", str(marian_dir), "--data", str(tmp_path / "val.de.gz"), "--eps", "0.1", "--methods", "gradient"]
    sizes = {name: p.numel() for name, p in transformers.MarianMTModel.from_pretrained(marian_dir).named_parameters()}
    positions = ["model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"]
    frozen = "frozen (requires_grad=False; by default only trainable parameters are probed)"
    assert main([*argv, "--no-progress", "--output-dir", str(tmp_path / "type")]) == 0
    config = ProbeTable.from_json(tmp_path / "type" / "report.json").config
    assert config["params_not_probed"] == {frozen: positions}  # Marian's fixed sinusoidal position tables
    assert config["params_total"] == sum(sizes.values()) == config["params_probed"] + 2 * 32 * 16
    markdown = (tmp_path / "type" / "probe.md").read_text()
    assert f"- **params_not_probed**: {frozen}: {', '.join(positions)}\n" in markdown
    # parameters no --group-regex takes are not probed either, and not counted as probed
    regex = ["--group-regex", r"self_attn\.=attention", "--no-progress", "--output-dir", str(tmp_path / "regex")]
    assert main([*argv, *regex]) == 0
    config = ProbeTable.from_json(tmp_path / "regex" / "report.json").config
    attention = [name for name in sizes if "self_attn." in name]
    assert config["params_probed"] == sum(sizes[name] for name in attention)
    assert config["params_not_probed"] == {
        frozen: positions,
        "in no group of `by`": [name for name in sizes if name not in attention + positions],
    }
    assert config["params_total"] == sum(sizes.values())


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
    for key in ("params_probed", "params_total", "params_not_probed"):  # counted in the merged model both ways
        assert tables["unmerged"].config[key] == tables["merged"].config[key], key
    assert tables["unmerged"].config["params_not_probed"] == {}  # the adapter factors are no parameters of its own
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
