"""ACR and ACRCallback on peft LoRA models (causal LM and seq2seq): only the adapters are corrupted and
trained, alpha = 0 is the plain PEFT run bit for bit, the acr/* logs; probing the unmerged model in
its base weights gives the merged model's table; the recipes' --lora_r."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_hf_callback import (
    ACR_KEYS,
    make_args,
    make_dataset,
    make_marian,
    make_model,
    make_translation_dataset,
    weights,
)
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
from acr_optim.integrations.hf import ACRCallback
from acr_optim.probe.merged import fixed_parameter_names
from acr_optim.integrations.peft import merged_parameters
from acr_optim.probe import probe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import _common
import de_en
import lm

TASKS = {  # task: (model, dataset, Trainer, TrainingArguments, LoraConfig settings)
    "causal": (
        make_model,
        make_dataset,
        Trainer,
        TrainingArguments,
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    ),
    "seq2seq": (
        make_marian,
        make_translation_dataset,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        {"target_modules": ["q_proj", "v_proj", "fc1"]},
    ),
}


def lora_model(task, dropout=0.0, **settings):
    """A tiny model of ``task`` with LoRA adapters (r = 4); ``settings`` override the LoraConfig."""
    build, *_, targets = TASKS[task]
    task_type = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}[task]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type=task_type, **targets, **settings)
    return peft.get_peft_model(build(dropout=dropout), config)  # build() seeds, so the adapters start the same too


def train(tmp_path, task, model, callback=None, **kwargs):
    _, dataset, trainer_class, args_class, _ = TASKS[task]
    settings = {"max_steps": 3, "learning_rate": 1e-2, "gradient_accumulation_steps": 1, **kwargs}
    trainer = trainer_class(
        model=model,
        args=make_args(tmp_path, args_class, **settings),
        train_dataset=dataset(),
        callbacks=[] if callback is None else [callback],
    )
    trainer.train()
    return trainer


def named(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("task", TASKS)
def test_callback_corrupts_and_trains_only_the_adapters(tmp_path, task, monkeypatch):
    model = lora_model(task)
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in name for name in adapters)
    before = named(model)
    corrupted = []  # per corrupting step: (names moved by perturb(), ||w + a - w||_2)
    perturb = ACR.perturb

    def spy(self):
        w = named(model)
        active = perturb(self)
        moved = {name: p.detach() - w[name] for name, p in model.named_parameters() if not torch.equal(p, w[name])}
        corrupted.append((set(moved), math.sqrt(sum(float(d.square().sum()) for d in moved.values()))))
        return active

    monkeypatch.setattr(ACR, "perturb", spy)
    trainer = train(tmp_path, task, model, ACRCallback(eps=0.1, alpha=0.5))

    assert len(corrupted) == 3
    for moved, norm in corrupted:
        assert moved and moved <= adapters
        assert norm == pytest.approx(0.1, rel=1e-4)
    after = named(model)
    assert {name for name in before if not torch.equal(before[name], after[name])} == adapters
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert all(math.isfinite(log[key]) for key in ACR_KEYS)
        assert log["acr/corruption_norm"] == pytest.approx(0.1)
        assert log["acr/corrupted_loss"] == pytest.approx(log["loss"] + log["acr/loss_gap"], rel=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_alpha_zero_is_bitwise_the_plain_peft_run(tmp_path, task):
    """With dropout in the model and in the adapters, accumulation and clipping."""
    settings = {"gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "weight_decay": 0.1}
    plain, wrapped = lora_model(task, dropout=0.1), lora_model(task, dropout=0.1)
    train(tmp_path / "plain", task, plain, **settings)
    train(tmp_path / "acr", task, wrapped, ACRCallback(eps=0.1, alpha=0.0), **settings)
    for a, b in zip(weights(plain), weights(wrapped)):
        assert torch.equal(a, b)


def test_acr_over_all_parameters_skips_the_frozen_base_weights():
    """ACR(AdamW(model.parameters())) equals ACR over the adapters alone bitwise: frozen weights, which get
    no gradient, enter neither the corruption's norm nor the weight decay, and stay as they were."""
    batch = {key: torch.tensor(value) for key, value in make_dataset()[:8].items()}

    def run(all_parameters):
        model = lora_model("causal")
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        params = [p for p in model.parameters() if all_parameters or p.requires_grad]
        optimizer = ACR(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), eps=0.1, alpha=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            optimizer.step(lambda: model(**batch).loss.backward())
        after = named(model)
        assert all(torch.equal(after[name], w) for name, w in frozen.items())
        return weights(model)

    for a, b in zip(run(all_parameters=True), run(all_parameters=False)):
        assert torch.equal(a, b)


# -- probing the deployed (merged) model -----------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_probe_unmerged_in_the_base_weights_gives_the_merged_table(task):
    # init_lora_weights=False: B != 0, so the merged weights differ from the base ones
    model = lora_model(task, init_lora_weights=False, modules_to_save=["ln_f"] if task == "causal" else None)
    if task == "causal":  # the trained copy of ln_f differs from the original: the merged model keeps the copy
        with torch.no_grad():
            model.base_model.model.transformer.ln_f.modules_to_save["default"].weight.mul_(1.5)
    model.eval()
    dataset = TASKS[task][1]()
    batches = [{key: torch.tensor(value) for key, value in dataset[i : i + 8].items()} for i in (0, 8)]
    reference = [model(**batch).loss for batch in batches]
    stand_ins = merged_parameters(model)
    merged = copy.deepcopy(model).merge_and_unload()
    assert list(stand_ins) == [name for name, _ in merged.named_parameters()]
    for batch, loss in zip(batches, reference):
        torch.testing.assert_close(merged(**batch).loss, loss)
    settings = {"eps": [0.05, 0.5], "method": ["gradient", "random"], "trials": 2}
    # The gradient of a key bias is zero in exact arithmetic (it adds q.b to every score of a query, which the
    # softmax ignores), so in floats it is rounding noise of order 1e-12 that may or may not come out exactly 0.
    # The non-zero count l0 of a gradient corruption may thus differ by at most the number of key-bias entries
    # (it did with peft 0.21, whose LoRA forward rounds differently from 0.18's).
    key_bias_entries = sum(
        p.numel() // 3 if name.endswith("c_attn.bias") else p.numel()
        for name, p in stand_ins.items()
        if name.endswith(("c_attn.bias", "k_proj.bias"))
    )
    for by in ("type", "layer"):
        unmerged_table = probe(model.get_base_model(), batches, by=by, params=stand_ins.values(), **settings)
        merged_table = probe(merged, batches, by=by, params=list(stand_ins), **settings)
        # the PEFT model itself, default params: its merged weights but the tables its class keeps fixed
        fixed = fixed_parameter_names(model.get_base_model())
        assert fixed == ({"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
                         if task == "seq2seq" else set())  # fmt: skip
        expected = probe(
            model.get_base_model(),
            batches,
            by=by,
            params=[p for n, p in stand_ins.items() if n not in fixed],
            **settings,
        )
        assert probe(model, batches, by=by, **settings).rows == expected.rows
        assert unmerged_table.config == merged_table.config
        assert len(unmerged_table.rows) == len(merged_table.rows) > 2 * 2 * 2
        for u, m in zip(unmerged_table.rows, merged_table.rows):
            assert u.keys() == m.keys()
            for key in u:
                if isinstance(u[key], float):
                    assert u[key] == pytest.approx(m[key], rel=1e-4, abs=1e-6), (by, u["group"], key)
                elif key == "l0":
                    assert abs(u[key] - m[key]) <= key_bias_entries, (by, u["group"], u[key], m[key])
                else:
                    assert u[key] == m[key], (by, key)
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_" in name or ".modules_to_save." in name)  # probe left the flags as they were


def test_faults_on_a_lora_model_need_the_merged_model():
    model = lora_model("causal", init_lora_weights=False)
    batch = {key: torch.tensor(value) for key, value in TASKS["causal"][1]()[:4].items()}
    with pytest.raises(ValueError, match=r"merge_and_unload\(\) for fault rows"):
        probe(model, [batch], faults=["int8"])


def test_merged_parameters_refuses_what_does_not_merge_additively():
    with pytest.raises(TypeError, match="peft.PeftModel"):
        merged_parameters(make_model())
    with pytest.raises(NotImplementedError, match="DoRA"):
        merged_parameters(lora_model("causal", use_dora=True))
    ia3 = peft.get_peft_model(
        make_model(), peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)
    )
    with pytest.raises(NotImplementedError, match="IA3"):
        merged_parameters(ia3)


# -- the recipes' --lora_r -------------------------------------------------------------------------


def pretrained(folder, recipe):
    """A tiny "pretrained" model of ``recipe`` and its tokenizer saved in ``folder``, as from_pretrained reads them."""

    text = [
        line for lang in ("de", "en") for line in (RECIPES / f"data/de_en_small/train.{lang}").read_text().splitlines()
    ]
    if recipe == "lm":
        tokenizer = _common.train_byte_level_tokenizer(text, 200)
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tokenizer))
        model = GPT2LMHeadModel(config)
    else:
        tokenizer = _common.train_sentencepiece_style_tokenizer(text, 300)
        model = MarianMTModel(_common.fit_to_tokenizer(tiny_marian_config(), tokenizer))
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "recipe, options, target",
    [("lm", ["--block_size", "16"], "c_attn"), ("de_en", ["--generation_max_length", "4"], "q_proj")],
)
def test_recipe_fine_tunes_lora_adapters_of_a_pretrained_model(tmp_path, recipe, options, target):
    main = {"lm": lm.main, "de_en": de_en.main}[recipe]
    model = pretrained(tmp_path / "pretrained", recipe)
    out = tmp_path / recipe
    main(
        [
            "--output_dir", str(out), "--model_name_or_path", str(model), "--max_steps", "2", "--max_train_samples",
            "64", "--max_eval_samples", "8", "--max_predict_samples", "8", "--corruption_eval_eps", "0.5",
            "--lora_r", "2", "--lora_alpha", "4", "--lora_target_modules", target, *options,
        ]
    )  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (2, 4, [target])
    assert adapter["base_model_name_or_path"] == str(model)
    assert not (out / "model.safetensors").exists()  # the Trainer saved the adapters only
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all("acr/loss_gap" in entry for entry in log if "loss" in entry)
    assert "eval_corrupted_eps_0.5_loss" in json.loads((out / "all_results.json").read_text())


def test_recipe_lora_arguments_are_validated():
    with pytest.raises(ValueError, match="--lora_r fine-tunes a pretrained model"):
        lm.LMArguments(lora_r=4)
    with pytest.raises(ValueError, match="--lora_r must be >= 1"):
        lm.LMArguments(lora_r=0, model_name_or_path="gpt2")
    with pytest.raises(ValueError, match="--lora_dropout"):
        lm.LMArguments(lora_r=4, model_name_or_path="gpt2", lora_dropout=1.0)
    with pytest.raises(ValueError, match="--lora_target_modules needs --lora_r"):
        lm.LMArguments(lora_target_modules=["c_attn"])
