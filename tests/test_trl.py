"""ACRCallback with TRL's SFTTrainer and DPOTrainer and sentence-transformers' SentenceTransformerTrainer.

Tiny models built from configs, a word-level tokenizer and in-memory datasets (nothing from the Hub): each
trainer trains with the callback and logs ``acr/*``; ``alpha = 0`` is bitwise the plain trainer, with the same
logs; at ``alpha > 0`` the trainer's own metrics (TRL's entropy, token accuracy, rewards and token counts,
sentence-transformers' loss components) are those of the clean pass, not counted again for the corrupted one,
and ``total_flos`` counts both passes; LoRA through TRL's ``peft_config`` corrupts only the adapters, and DPO
never moves its reference model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tiny_models import tiny_bert_config
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from acr_optim import ACR
from acr_optim.integrations.hf import ACRCallback

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "big", "small", "red", "blue"]
ACR_KEYS = {"acr/corrupted_loss", "acr/loss_gap", "acr/corruption_norm", "acr/first_order_gain"}
# what the Trainer logs itself, or measures in wall-clock time; every other key of a training log is the trainer's own
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step"}
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sentences(n: int, seed: int, words: int = 6) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, words), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in row) for row in picks]


def gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS) + 3,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def common_args(tmp_path, **settings) -> dict:
    """2 optimizer steps of 2 micro-batches of 2 rows, logged every step."""
    return {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **settings,
    }


def sft(tmp_path, callbacks, peft_config=None, dropout=0.1, **settings):
    trl = pytest.importorskip("trl")
    return trl.SFTTrainer(
        model=gpt2(dropout),
        args=trl.SFTConfig(**common_args(tmp_path, max_length=16, **settings)),
        train_dataset=datasets.Dataset.from_dict({"text": sentences(8, seed=0)}),
        processing_class=word_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def dpo(tmp_path, callbacks, peft_config=None, **settings):
    """DPO from a tiny GPT-2; without LoRA the reference model is a copy of it (with LoRA: the adapters disabled)."""
    trl = pytest.importorskip("trl")
    model = gpt2()
    rows = sentences(8, seed=1, words=3), sentences(8, seed=2, words=4), sentences(8, seed=3, words=4)
    return trl.DPOTrainer(
        model=model,
        ref_model=None if peft_config else copy.deepcopy(model),
        args=trl.DPOConfig(**common_args(tmp_path, max_length=16, **settings)),
        train_dataset=datasets.Dataset.from_dict(dict(zip(("prompt", "chosen", "rejected"), rows))),
        processing_class=word_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


class RankingLoss(torch.nn.Module):
    """In-batch ranking of each anchor's positive among the batch's positives, reported as two loss components.

    A loss that returns a dict makes SentenceTransformerTrainer accumulate and log each component.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: list[dict], labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        anchors, positives = (self.model(feature)["sentence_embedding"] for feature in features)
        loss = torch.nn.functional.cross_entropy(anchors @ positives.T, torch.arange(len(anchors)))
        return {"ranking": loss, "ranking_half": 0.5 * loss}


def sentence_transformer(tmp_path, callbacks, **settings):
    """A 1-layer BERT (dropout 0.1) with mean pooling, saved with its tokenizer to a local folder and loaded."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Pooling, Transformer
    folder = tmp_path / "bert"
    tok = word_tokenizer()
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config(vocab_size=len(tok), pad_token_id=0)).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = st.SentenceTransformer(modules=[Transformer(str(folder)), Pooling(16)])
    data = {"anchor": sentences(8, seed=4), "positive": sentences(8, seed=5)}
    return st.SentenceTransformerTrainer(
        model=model,
        args=st.SentenceTransformerTrainingArguments(**common_args(tmp_path, **settings)),
        train_dataset=datasets.Dataset.from_dict(data),
        loss=RankingLoss(model),
        callbacks=callbacks,
    )


TRAINERS = {"sft": sft, "dpo": dpo, "sentence-transformers": sentence_transformer}


def train(kind, tmp_path, callback=None, **settings):
    trainer = TRAINERS[kind](tmp_path, [] if callback is None else [callback], **settings)
    trainer.train()
    return trainer


def step_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


def own_metrics(log: dict) -> dict:
    """The keys the trainer subclass adds to a training log (TRL's metrics, sentence-transformers' components)."""
    return {key: value for key, value in log.items() if key not in TRAINER_KEYS and not key.startswith("acr/")}


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("kind", TRAINERS)
def test_alpha_zero_is_bitwise_the_plain_trainer_with_the_same_logs(tmp_path, kind):
    plain = train(kind, tmp_path / "plain")
    wrapped = train(kind, tmp_path / "acr", ACRCallback(eps=0.1, alpha=0.0))
    for a, b in zip(weights(plain), weights(wrapped), strict=True):
        assert torch.equal(a, b)

    def without_timing(trainer):
        return [{k: v for k, v in log.items() if k not in TIMING_KEYS} for log in trainer.state.log_history]

    assert without_timing(wrapped) == without_timing(plain)
    assert own_metrics(step_logs(plain)[0])  # the comparison covers the trainer's own metrics


@pytest.mark.parametrize("kind", TRAINERS)
def test_trains_logs_acr_and_counts_its_own_metrics_once(tmp_path, kind):
    plain = train(kind, tmp_path / "plain")
    trainer = TRAINERS[kind](tmp_path / "acr", [ACRCallback(eps=0.1, alpha=0.5)])
    before = weights(trainer)
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(trainer), strict=True))

    logs, plain_logs = step_logs(trainer), step_logs(plain)
    assert len(logs) == len(plain_logs) == 2
    for log in logs:
        assert ACR_KEYS <= log.keys()
        assert all(math.isfinite(log[key]) for key in ACR_KEYS)
        assert log["acr/corruption_norm"] == pytest.approx(0.1)
        assert log["acr/corrupted_loss"] == pytest.approx(log["loss"] + log["acr/loss_gap"], rel=1e-5)
    # The first step's metrics come from the clean passes at the same weights as the plain run's: any value of
    # the corrupted pass averaged in, or any count added twice, would show.
    assert own_metrics(logs[0]) == own_metrics(plain_logs[0])
    if "num_tokens" in plain_logs[-1]:  # TRL's running count of training tokens
        assert logs[-1]["num_tokens"] == plain_logs[-1]["num_tokens"]
    # The corrupted pass is a second forward and backward on the same micro-batches.
    assert trainer.state.total_flos == 2 * plain.state.total_flos


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_lora_through_peft_config_corrupts_and_trains_only_the_adapters(tmp_path, kind, monkeypatch):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    trainers = []
    moved_by_perturb = []
    perturb = ACR.perturb

    def spy(self):
        model = trainers[0].model
        w = {name: p.detach().clone() for name, p in model.named_parameters()}
        active = perturb(self)
        moved_by_perturb.append({name for name, p in model.named_parameters() if not torch.equal(p, w[name])})
        return active

    monkeypatch.setattr(ACR, "perturb", spy)
    trainer = TRAINERS[kind](tmp_path, [ACRCallback(eps=0.1, alpha=0.5)], peft_config=config)
    trainers.append(trainer)
    adapters = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in name for name in adapters)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(moved_by_perturb) == 2
    assert all(moved and moved <= adapters for moved in moved_by_perturb)
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= adapters
    assert ACR_KEYS <= step_logs(trainer)[0].keys()


def test_dpo_corrupts_the_policy_and_never_the_reference_model(tmp_path, monkeypatch):
    trainer = dpo(tmp_path, [ACRCallback(eps=0.1, alpha=0.5)])
    reference = [p.detach().clone() for p in trainer.ref_model.parameters()]
    policy = {id(p) for p in trainer.model.parameters()}
    corrupted = []
    perturb = ACR.perturb

    def spy(self):
        active = perturb(self)
        corrupted.append(
            {id(p) for group in self.param_groups for p in group["params"]} <= policy
            and all(torch.equal(a, b) for a, b in zip(reference, trainer.ref_model.parameters()))
        )
        return active

    monkeypatch.setattr(ACR, "perturb", spy)
    trainer.train()
    assert corrupted == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.ref_model.parameters()))
