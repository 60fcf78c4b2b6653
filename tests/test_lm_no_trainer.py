"""recipes/lm_no_trainer.py: the accelerate loop takes the same steps for any split of the same global batch
(2 processes, gradient accumulation), resumes exactly from a checkpoint, and runs under bf16 autocast."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file
from transformers import GPT2Config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lm_no_trainer.py"
sys.path.insert(0, str(RECIPE.parent))

import lm_no_trainer

GLOBAL_BATCH, STEPS = 8, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """A GPT-2 of 20k parameters without dropout, so that any split of a batch computes the same gradient."""
    folder = tmp_path_factory.mktemp("config")
    GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_inner=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ).save_pretrained(folder)
    return folder


def arguments(output_dir: Path, model_config: Path, batch: int, accumulation: int = 1) -> list[str]:
    # fmt: off
    return [
        "--output_dir", str(output_dir), "--model_config", str(model_config), "--tokenizer_vocab_size", "300",
        "--max_train_samples", "200", "--max_eval_samples", "16", "--max_predict_samples", "8", "--block_size", "32",
        "--max_train_steps", str(STEPS), "--num_warmup_steps", "1", "--learning_rate", "1e-3", "--logging_steps", "2",
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
        "--acr_eps", "0.5", "--acr_alpha", "0.7", "--corruption_eval_eps", "0.5", "--corruption_eval_faults", "int8",
    ]
    # fmt: on


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_config):
    """1 process, batches of 8, a checkpoint every 2 steps: the run every other split is compared with."""
    out = tmp_path_factory.mktemp("reference")
    metrics = lm_no_trainer.main([*arguments(out, model_config, GLOBAL_BATCH), "--checkpointing_steps", "2"])
    return out, metrics


def test_reference_run_writes_lm_results(reference):
    out, metrics = reference
    found = results(out)
    assert found["train_steps"] == STEPS and metrics["train_steps"] == STEPS
    assert found["eval_perplexity"] == math.exp(found["eval_loss"])
    assert found["test_perplexity"] == math.exp(found["test_loss"])
    assert found["eval_corrupted_eps_0.5_loss"] - found["eval_loss"] > 0
    assert found["robustness"] == {
        "metric": "perplexity",
        "p": 2.0,
        "n": None,
        "rows": [
            {"eps": 0.0, "perplexity": found["eval_perplexity"], "loss_increase": 0.0},
            {
                "eps": 0.5,
                "perplexity": found["eval_corrupted_eps_0.5_perplexity"],
                "loss_increase": found["eval_corrupted_eps_0.5_loss_increase"],
            },
        ],
        "faults": [
            {
                "fault": "int8",
                "label": "int8 weights, per channel",
                "perplexity": found["eval_fault_int8_perplexity"],
                "loss_increase": found["eval_fault_int8_loss_increase"],
            }
        ],
    }
    card = (out / "README.md").read_text()
    assert "| `optimizer_steps` | 4 |" in card and "| int8 weights, per channel (`int8`) |" in card
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4"]
    halfway, final = weights(out / "step_2"), weights(out)
    assert not any(torch.equal(halfway[name], final[name]) for name in final)


def test_accumulating_2_micro_batches_of_4_equals_batches_of_8(reference, model_config, tmp_path):
    out = tmp_path / "accumulated"
    lm_no_trainer.main(arguments(out, model_config, batch=GLOBAL_BATCH // 2, accumulation=2))
    assert_close(weights(out), weights(reference[0]))
    assert results(out)["eval_loss"] == pytest.approx(results(reference[0])["eval_loss"], rel=1e-6)


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(reference, model_config, tmp_path):
    out = tmp_path / "resumed"
    checkpoint = reference[0] / "step_2"
    lm_no_trainer.main([*arguments(out, model_config, GLOBAL_BATCH), "--resume_from_checkpoint", str(checkpoint)])
    expected, resumed = weights(reference[0]), weights(out)
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert results(out)["eval_loss"] == results(reference[0])["eval_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(reference, model_config, tmp_path):
    out = tmp_path / "two_processes"
    # fmt: off
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(RECIPE), *arguments(out, model_config, batch=GLOBAL_BATCH // 2), "--use_cpu", "true",
    ]
    # fmt: on
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert_close(weights(out), weights(reference[0]))
    for key in ("eval_loss", "eval_corrupted_eps_0.5_loss", "eval_corrupted_eps_0.5_loss_increase"):
        assert results(out)[key] == pytest.approx(results(reference[0])[key], rel=1e-5), key
    assert "2 process(es)" in run.stdout


def test_bf16_mixed_precision(model_config, tmp_path):
    # A process of its own: accelerate fixes the mixed precision once per process.
    out = tmp_path / "bf16"
    command = [sys.executable, str(RECIPE), *arguments(out, model_config, GLOBAL_BATCH), "--mixed_precision", "bf16"]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "mixed precision bf16" in run.stdout
    assert all(t.dtype == torch.float32 for t in weights(out).values())  # autocast: fp32 weights, bf16 matmuls
    found = results(out)
    assert math.isfinite(found["eval_loss"]) and found["eval_corrupted_eps_0.5_loss_increase"] > 0
    logs = [json.loads(line.split(": ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [sorted(log) for log in logs] == [["acr/corrupted_loss", "acr/loss_gap", "learning_rate", "loss"]] * 2
