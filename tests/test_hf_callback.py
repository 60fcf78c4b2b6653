"""ACRCallback inside the Hugging Face Trainer: equivalence with a hand-written ACR loop, gradient
accumulation, clipping, exact alpha = 0 and resume, dropout masks, mixed precision, logs, errors;
subclasses that wrap training_step (as TRL's do) and what is refused, total_flos, FSDP/DeepSpeed."""

import contextlib
import inspect
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import SequentialSampler

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tiny_models import tiny_marian_config
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MarianMTModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

from acr_optim import ACR
from acr_optim.integrations import hf
from acr_optim.integrations.hf import ACRCallback

VOCAB, LENGTH, ROWS = 64, 12, 32
ACR_KEYS = {"acr/corrupted_loss", "acr/loss_gap", "acr/corruption_norm", "acr/first_order_gain"}


def make_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def make_dataset(masked=True):
    """Token rows; with ``masked`` some labels are -100, so ``num_items_in_batch`` differs between micro-batches.

    The first label of each row is masked too: the causal-LM loss never predicts it, and older 5.x Trainers
    count ``num_items_in_batch`` over the unshifted labels, so this keeps their count equal to the shifted
    one the loss averages over, in every supported version.
    """
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    labels = ids.clone()
    if masked:
        labels[torch.rand(ROWS, LENGTH, generator=gen) < 0.3] = -100
        labels[:, 0] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


# transformers < 5.2 has no train_sampling_strategy and always shuffles: the autouse fixture below gives its
# Trainer the sequential order the hand-written references replay (there, "random" runs are sequential too).
HAS_SAMPLING_STRATEGY = "train_sampling_strategy" in TrainingArguments.__dataclass_fields__


@pytest.fixture(autouse=True)
def sequential_order_before_5_2(monkeypatch):
    if not HAS_SAMPLING_STRATEGY:
        monkeypatch.setattr(
            Trainer,
            "_get_train_sampler",
            lambda self, dataset=None: SequentialSampler(self.train_dataset if dataset is None else dataset),
        )


def make_args(tmp_path, cls=TrainingArguments, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "seed": 0,
    }
    settings = {**defaults, **kwargs}
    if not HAS_SAMPLING_STRATEGY:
        del settings["train_sampling_strategy"]
    return cls(**settings)


def train(tmp_path, model, optimizer=None, callback=None, **kwargs):
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, **kwargs),
        train_dataset=make_dataset(),
        optimizers=(optimizer, None),
        callbacks=[] if callback is None else [callback],
    )
    trainer.train()
    return trainer


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def hand_written_acr(model, optimizer, dataset, rows_per_step, steps, max_grad_norm=0.0):
    """The reference: one ACR step per ``rows_per_step`` rows, loss = mean over the step's labelled tokens."""
    ids, labels = torch.tensor(dataset["input_ids"]), torch.tensor(dataset["labels"])
    model.train()
    for step in range(steps):
        batch = {"input_ids": ids[step * rows_per_step : (step + 1) * rows_per_step]}
        batch["labels"] = labels[step * rows_per_step : (step + 1) * rows_per_step]
        model(**batch).loss.backward()
        with optimizer.perturbed() as active:
            assert active
            model(**batch).loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_matches_hand_written_acr_loop(tmp_path, max_grad_norm):
    """2 micro-batches of 4 with num_items_in_batch normalisation, clipping of the mixed gradient."""
    trainer_model, loop_model = make_model(), make_model()
    optimizer = ACR(torch.optim.SGD(trainer_model.parameters(), lr=0.5), eps=0.05, alpha=0.5)
    trainer = train(tmp_path, trainer_model, optimizer, ACRCallback(), max_grad_norm=max_grad_norm)
    reference = ACR(torch.optim.SGD(loop_model.parameters(), lr=0.5), eps=0.05, alpha=0.5)
    hand_written_acr(loop_model, reference, make_dataset(), rows_per_step=8, steps=3, max_grad_norm=max_grad_norm)
    assert_close(weights(trainer_model), weights(loop_model), rtol=1e-5, atol=1e-6)
    if max_grad_norm:  # clipped, so SGD moved each step by exactly lr * max_grad_norm
        assert trainer.state.log_history[0]["grad_norm"] > max_grad_norm


def test_gradient_accumulation_2x4_equals_1x8(tmp_path):
    runs = []
    for batch, accumulation in [(4, 2), (8, 1)]:
        model = make_model()
        optimizer = ACR(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), eps=0.1, p=2, alpha=0.7, n=500)
        trainer = train(
            tmp_path / str(batch),
            model,
            optimizer,
            ACRCallback(),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=1.0,
        )
        runs.append((weights(model), trainer.state.log_history))
    (w_ga, logs_ga), (w_full, logs_full) = runs
    assert_close(w_ga, w_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(logs_ga[:-1], logs_full[:-1]):
        for key in ACR_KEYS | {"loss"}:
            # abs: acr/loss_gap is the difference of two float32 losses near 4, each a few ulps (4.8e-7) apart
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=2e-6)


def test_alpha_zero_is_bitwise_the_plain_trainer(tmp_path):
    """With dropout, accumulation, clipping and the default linear schedule; both ways of giving the optimizer."""
    settings = {
        "gradient_accumulation_steps": 2,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "linear",
        "train_sampling_strategy": "random",
        "weight_decay": 0.1,
    }
    plain = make_model(dropout=0.1)
    train(tmp_path / "plain", plain, **settings)
    rng_after_plain = torch.get_rng_state()

    wrapped = make_model(dropout=0.1)
    train(tmp_path / "wrapped", wrapped, callback=ACRCallback(eps=0.1, alpha=0.0), **settings)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)

    for a, b in zip(weights(plain), weights(wrapped)):
        assert torch.equal(a, b)

    plain, given = make_model(dropout=0.1), make_model(dropout=0.1)
    train(tmp_path / "plain_given", plain, torch.optim.Adam(plain.parameters(), lr=1e-2), **settings)
    base = torch.optim.Adam(given.parameters(), lr=1e-2)
    train(tmp_path / "given", given, ACR(base, eps=0.1, alpha=0.0), ACRCallback(), **settings)
    for a, b in zip(weights(plain), weights(given)):
        assert torch.equal(a, b)


def test_corrupted_pass_sees_the_clean_dropout_masks_and_rng_continues(tmp_path):
    """With a tiny eps the corrupted loss equals the clean one to first order only if the masks match."""
    model = make_model(dropout=0.5)
    optimizer = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=1e-4, alpha=1.0)
    trainer = train(tmp_path, model, optimizer, ACRCallback(), max_steps=2)
    rng_after_acr = torch.get_rng_state()
    for log in trainer.state.log_history[:-1]:
        assert 0 < log["acr/loss_gap"] == pytest.approx(log["acr/first_order_gain"], rel=0.05)
    plain = make_model(dropout=0.5)
    train(tmp_path / "plain", plain, torch.optim.SGD(plain.parameters(), lr=0.1), max_steps=2)
    assert torch.equal(torch.get_rng_state(), rng_after_acr)  # dropout draws continue as without ACR


def test_resume_from_checkpoint_continues_identically(tmp_path):
    settings = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "train_sampling_strategy": "random",
        "lr_scheduler_type": "linear",
        "max_grad_norm": 1.0,
    }

    def run(out, resume=None):
        model = make_model(dropout=0.1)
        args = make_args(out, **settings)
        trainer = Trainer(
            model=model, args=args, train_dataset=make_dataset(), callbacks=[ACRCallback(eps=0.1, alpha=0.5)]
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, full_trainer = run(tmp_path / "a")
    resumed, resumed_trainer = run(tmp_path / "b", resume=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for a, b in zip(weights(full), weights(resumed)):
        assert torch.equal(a, b)
    full_logs, resumed_logs = full_trainer.state.log_history, resumed_trainer.state.log_history
    assert [log["acr/corrupted_loss"] for log in full_logs[2:4]] == [
        log["acr/corrupted_loss"] for log in resumed_logs[2:4]
    ]


def test_logs_report_the_corruption(tmp_path):
    model = make_model()
    optimizer = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.2, p=2, alpha=0.5)
    trainer = train(tmp_path, model, optimizer, ACRCallback(), logging_steps=2, max_steps=4)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert ACR_KEYS <= log.keys()
        assert log["acr/corruption_norm"] == pytest.approx(0.2)
        assert log["acr/corrupted_loss"] == pytest.approx(log["loss"] + log["acr/loss_gap"], rel=1e-6)
        assert 0 < log["acr/loss_gap"] < 2 * log["acr/first_order_gain"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # on CPU accelerate autocasts fp16 without a GradScaler
def test_mixed_precision_trains_and_logs(tmp_path, precision):
    model = make_model()
    before = weights(model)
    trainer = train(tmp_path, model, callback=ACRCallback(eps=0.1, alpha=0.5), max_steps=2, **{precision: True})
    log = trainer.state.log_history[0]
    assert all(math.isfinite(log[key]) for key in ACR_KEYS | {"loss"})
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))


def make_marian(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = tiny_marian_config(
        vocab_size=VOCAB,
        max_position_embeddings=16,
        pad_token_id=1,
        eos_token_id=0,
        decoder_start_token_id=1,
        dropout=dropout,
        attention_dropout=dropout,
    )
    return MarianMTModel(config)


def make_translation_dataset():
    """16 pairs of 8 source and 6 target tokens (ids >= 2: no pad or EOS)."""
    gen = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(2, VOCAB, (16, 8), generator=gen), torch.randint(2, VOCAB, (16, 6), generator=gen)
    return datasets.Dataset.from_dict({"input_ids": src.tolist(), "labels": tgt.tolist()})


def test_seq2seq_trainer_matches_hand_written_acr_loop(tmp_path):
    dataset = make_translation_dataset()
    model = make_marian()
    # one micro-batch: Marian's loss ignores num_items_in_batch, which the Trainer believes it uses
    args = make_args(
        tmp_path, Seq2SeqTrainingArguments, max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1
    )
    optimizer = ACR(torch.optim.SGD(model.parameters(), lr=0.5), eps=0.05, alpha=0.5)
    Seq2SeqTrainer(
        model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None), callbacks=[ACRCallback()]
    ).train()

    reference_model = make_marian()
    reference = ACR(torch.optim.SGD(reference_model.parameters(), lr=0.5), eps=0.05, alpha=0.5)
    hand_written_acr(reference_model, reference, dataset, rows_per_step=8, steps=2)
    assert_close(weights(model), weights(reference_model), rtol=1e-5, atol=1e-6)


def test_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="need eps"):
        ACRCallback(alpha=0.3)
    with pytest.raises(ValueError, match="eps"):
        ACRCallback(eps=-1.0)
    model = make_model()
    with pytest.raises(TypeError, match="needs an ACR optimizer"):
        train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), ACRCallback())
    with pytest.raises(ValueError, match="already is an ACR optimizer"):
        train(tmp_path, model, ACR(torch.optim.SGD(model.parameters(), lr=0.1)), ACRCallback(eps=0.1))
    monkeypatch.setattr(hf.transformers, "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match="supports transformers >= 5.0"):
        ACRCallback()
    monkeypatch.undo()
    sharded = SimpleNamespace(
        is_deepspeed_enabled=False,
        is_fsdp_enabled=True,
        get_tp_size=lambda: 1,
        get_cp_size=lambda: 1,
        get_sp_size=lambda: 1,
    )
    with pytest.raises(NotImplementedError, match="does not support FSDP through the Trainer yet: it is not verified"):
        hf._check_unsupported_parallelism(sharded)
    sharded.is_fsdp_enabled, sharded.is_deepspeed_enabled = False, True
    with pytest.raises(NotImplementedError, match="DeepSpeed: its engine steps the optimizer inside backward"):
        hf._check_unsupported_parallelism(sharded)


def test_changed_trainer_internals_fail_naming_them_and_the_version(tmp_path, monkeypatch):
    version = f"transformers {transformers.__version__}"
    monkeypatch.setattr(Trainer, "training_step", lambda self, model, inputs: None)  # the pre-4.46 signature
    model = make_model()
    with pytest.raises(RuntimeError, match="Trainer internals") as error:
        train(tmp_path, model, ACR(torch.optim.SGD(model.parameters(), lr=0.1)), ACRCallback())
    assert version in str(error.value)
    assert "Trainer.training_step(model, inputs, num_items_in_batch)" in str(error.value)
    assert "Trainer.log" not in str(error.value)  # only what changed is named
    with pytest.raises(RuntimeError, match="could not find its Trainer") as error:
        ACRCallback().on_train_begin(make_args(tmp_path), None, None)  # called from no Trainer
    assert version in str(error.value)


class WrappingTrainer(Trainer):
    """A subclass written as TRL writes its trainers: ``training_step`` wrapped, ``compute_loss`` keeping counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_seen = 0
        self.losses_seen = []

    def training_step(self, *args, **kwargs):
        with contextlib.nullcontext():  # where TRL enters its activation-offload context
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.batches_seen += 1
        self.losses_seen.append(loss.item())
        return loss


def test_a_subclass_that_wraps_training_step_trains_as_the_trainer_and_counts_each_batch_once(tmp_path):
    reference_model, model = make_model(), make_model()
    optimizer = ACR(torch.optim.SGD(reference_model.parameters(), lr=0.5))
    reference = train(tmp_path / "reference", reference_model, optimizer, ACRCallback())
    trainer = WrappingTrainer(
        model=model,
        args=make_args(tmp_path / "subclass"),
        train_dataset=make_dataset(),
        optimizers=(ACR(torch.optim.SGD(model.parameters(), lr=0.5)), None),
        callbacks=[ACRCallback()],
    )
    trainer.train()
    for a, b in zip(weights(reference_model), weights(model), strict=True):
        assert torch.equal(a, b)
    assert trainer.batches_seen == len(trainer.losses_seen) == 6  # 3 steps of 2 micro-batches, the clean passes only
    assert [log["acr/corrupted_loss"] for log in trainer.state.log_history[:-1]] == [
        log["acr/corrupted_loss"] for log in reference.state.log_history[:-1]
    ]


def test_total_flos_counts_the_corrupted_pass(tmp_path):
    plain = train(tmp_path / "plain", make_model(), max_steps=2)
    acr = train(tmp_path / "acr", make_model(), callback=ACRCallback(eps=0.1, alpha=0.5), max_steps=2)
    no_replay = train(tmp_path / "alpha0", make_model(), callback=ACRCallback(eps=0.1, alpha=0.0), max_steps=2)
    assert acr.state.total_flos == 2 * plain.state.total_flos > 0
    assert no_replay.state.total_flos == plain.state.total_flos


class NarrowTrainer(Trainer):
    def training_step(self, model, inputs):  # the pre-4.46 signature, in a subclass
        return super().training_step(model, inputs)


class GeneratingTrainer(Trainer):
    def _prepare_inputs(self, inputs):  # where TRL's online trainers generate completions from the policy
        return super()._prepare_inputs(inputs)


def test_subclasses_the_replay_cannot_drive_are_refused_naming_them(tmp_path):
    with pytest.raises(RuntimeError, match="ACRCallback cannot train with NarrowTrainer") as error:
        NarrowTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[ACRCallback(eps=0.1)])
    expected = (
        "test_hf_callback.NarrowTrainer overrides Trainer.training_step(model, inputs, num_items_in_batch) "
        "as training_step(model, inputs)"
    )
    assert expected in str(error.value)
    assert f"transformers {transformers.__version__}" not in str(error.value)  # not the version's fault
    with pytest.raises(NotImplementedError, match="GeneratingTrainer overrides Trainer._prepare_inputs"):
        GeneratingTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[ACRCallback(eps=0.1)])


def test_deepspeed_dropped_under_use_cpu_warns(recwarn):
    """Under use_cpu accelerate runs --deepspeed as DDP (a stub trainer: the tests do not install deepspeed)."""
    trainer = SimpleNamespace(
        args=SimpleNamespace(use_cpu=True, fsdp=[], deepspeed="ds_config.json", process_index=0),
        is_fsdp_enabled=False,
        is_deepspeed_enabled=False,
    )
    with pytest.warns(UserWarning, match="--deepspeed ignored under use_cpu: .* turned this run into plain DDP"):
        hf._warn_if_sharding_was_dropped(trainer)
    trainer.args.use_cpu = False  # a launch where DeepSpeed was enabled would have been refused before
    hf._warn_if_sharding_was_dropped(trainer)
    assert not [w for w in recwarn if "use_cpu" in str(w.message)]


FSDP_ON_CPU = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
from test_hf_callback import ACRCallback, Trainer, make_args, make_dataset, make_model
from pathlib import Path
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = Trainer(
        model=make_model(), args=make_args(Path(sys.argv[2]), fsdp=True, max_steps=1),
        train_dataset=make_dataset(), callbacks=[ACRCallback(eps=0.1)],
    )
trainer.train()
print(json.dumps({"warnings": [str(w.message) for w in caught if "use_cpu" in str(w.message)],
                  "fsdp": trainer.is_fsdp_enabled, "log": trainer.state.log_history[0]}))
"""


def test_fsdp_under_use_cpu_runs_as_ddp_with_one_warning(tmp_path):
    """A distributed launch (one process) with --fsdp and use_cpu: accelerate runs DDP; the callback says so once."""
    from accelerate import FullyShardedDataParallelPlugin

    if "fsdp_version" not in inspect.signature(FullyShardedDataParallelPlugin).parameters:
        pytest.skip("transformers passes --fsdp on as fsdp_version, which this accelerate's FSDP plugin does not take")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-c", FSDP_ON_CPU, str(Path(__file__).parent), str(tmp_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1
    assert report["warnings"][0].startswith("--fsdp ignored under use_cpu: accelerate enables FSDP and DeepSpeed")
    assert not report["fsdp"]
    assert ACR_KEYS <= report["log"].keys()


def test_a_fault_callback_trains_against_the_fault_and_logs(tmp_path):
    model = make_model()
    before = weights(model)
    trainer = train(tmp_path, model, callback=ACRCallback(fault="int4:g16", fault_mode="worst", alpha=0.5))
    acr = hf.find_acr(trainer.optimizer)  # inside accelerate's AcceleratedOptimizer
    assert acr.defaults["acr_fault"] == "int4:g16" and acr.defaults["acr_alpha"] == 0.5
    logged = [row for row in trainer.state.log_history if "acr/first_order_gain" in row]
    assert logged and all(row["acr/first_order_gain"] > 0 for row in logged)
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))
    with pytest.raises(ValueError, match="give eps .* or fault .*, not both"):
        ACRCallback(eps=0.1, fault="int8")
    with pytest.raises(ValueError, match="fault_mode must be one of"):
        ACRCallback(fault="int8", fault_mode="best")
    with pytest.raises(ValueError, match="need eps or fault"):
        ACRCallback(fault_radius=0.5)
