"""Parameter grouping by type and by layer on Hugging Face configs and plain modules (no forward pass)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_marian_config

from acr_optim.probe import group_parameters


def gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )


def bert():
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
            max_position_embeddings=32,
        )
    )


def marian():
    return transformers.MarianMTModel(
        tiny_marian_config(decoder_layers=2, vocab_size=50, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    )


def t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50, decoder_start_token_id=0
        )
    )


def bart():
    return transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            vocab_size=50,
            max_position_embeddings=32,
        )
    )


def _partition_ok(model, groups):
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    flat = [k for members in groups.values() for k in members]
    assert sorted(flat) == sorted(trainable) and len(flat) == len(set(flat))


EXPECTED_TYPES = {
    "gpt2": {
        "transformer.wte.weight": "embedding",
        "transformer.wpe.weight": "embedding",
        "transformer.h.0.ln_1.weight": "norm",
        "transformer.ln_f.bias": "norm",
        "transformer.h.1.attn.c_attn.weight": "attention",
        "transformer.h.0.attn.c_proj.bias": "attention",
        "transformer.h.0.mlp.c_fc.weight": "feed_forward",
        "transformer.h.1.mlp.c_proj.bias": "feed_forward",
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": "embedding",
        "bert.embeddings.token_type_embeddings.weight": "embedding",
        "bert.embeddings.LayerNorm.weight": "norm",
        "bert.encoder.layer.1.output.LayerNorm.bias": "norm",
        "bert.encoder.layer.0.attention.self.query.weight": "attention",
        "bert.encoder.layer.0.attention.output.dense.weight": "attention",
        "bert.encoder.layer.0.intermediate.dense.weight": "feed_forward",
        "bert.encoder.layer.1.output.dense.bias": "feed_forward",
        "classifier.weight": "feed_forward",
    },
    "marian": {
        "model.shared.weight": "embedding",
        "model.encoder.layers.0.self_attn_layer_norm.weight": "norm",
        "model.decoder.layers.1.encoder_attn.q_proj.weight": "attention",
        "model.decoder.layers.0.self_attn.out_proj.bias": "attention",
        "model.encoder.layers.0.fc1.weight": "feed_forward",
        "model.decoder.layers.1.fc2.bias": "feed_forward",
    },
    "t5": {
        "shared.weight": "embedding",
        "encoder.final_layer_norm.weight": "norm",
        "decoder.block.0.layer.1.EncDecAttention.k.weight": "attention",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight": "feed_forward",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "embedding",
    },
    "bart": {
        "model.encoder.embed_positions.weight": "embedding",
        "model.decoder.layernorm_embedding.weight": "norm",
        "model.encoder.layers.0.self_attn.k_proj.weight": "attention",
        "model.decoder.layers.0.fc1.bias": "feed_forward",
    },
}
BUILDERS = {"gpt2": gpt2, "bert": bert, "marian": marian, "t5": t5, "bart": bart}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_group_by_type_partitions_trainable_parameters(arch):
    model = BUILDERS[arch]()
    groups = group_parameters(model, "type")
    _partition_ok(model, groups)
    assert set(groups) <= {"embedding", "norm", "attention", "feed_forward"}
    type_of = {k: g for g, members in groups.items() for k in members}
    for name, expected in EXPECTED_TYPES[arch].items():
        assert type_of[name] == expected, name


EXPECTED_LAYERS = {
    "gpt2": ["wte", "wpe", "h.0", "h.1", "ln_f"],
    "bert": ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler", "classifier"],
    "marian": ["shared", "encoder.layers.0", "decoder.layers.0", "decoder.layers.1"],
    "t5": ["shared", "encoder.block.0", "encoder", "decoder.block.0", "decoder"],
    "bart": ["shared", "encoder", "encoder.layers.0", "decoder", "decoder.layers.0"],
}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_group_by_layer_finds_blocks(arch):
    model = BUILDERS[arch]()
    groups = group_parameters(model, "layer")
    _partition_ok(model, groups)
    assert list(groups) == EXPECTED_LAYERS[arch]


def test_marian_frozen_sinusoidal_positions_left_out_unless_named():
    model = marian()
    frozen = "model.encoder.embed_positions.weight"
    assert not model.get_parameter(frozen).requires_grad
    assert frozen not in group_parameters(model, "all")["all"]
    assert group_parameters(model, "type", names=[frozen, "model.shared.weight"]) == {
        "embedding": ["model.shared.weight", frozen]
    }


def test_plain_module_types_and_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert group_parameters(model, "type") == {
        "convolution": ["0.weight", "0.bias"],
        "norm": ["1.weight", "1.bias"],
        "feed_forward": ["4.weight", "4.bias"],
        "other": ["scale"],
    }
    assert group_parameters(model, "layer") == {
        "0": ["0.weight", "0.bias"],
        "1": ["1.weight", "1.bias"],
        "4": ["4.weight", "4.bias"],
        "scale": ["scale"],
    }
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    types = group_parameters(layer, "type")
    assert types["attention"] == [
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
        "self_attn.out_proj.weight",
        "self_attn.out_proj.bias",
    ]
    assert types["feed_forward"] == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]


def test_user_groupings_mapping_regex_callable():
    model = gpt2()
    assert group_parameters(model, {"transformer.wte.weight": "tok", "transformer.ln_f.bias": "final"}) == {
        "tok": ["transformer.wte.weight"],
        "final": ["transformer.ln_f.bias"],
    }
    regex = group_parameters(model, [(r"\.bias$", "bias"), (r"\.h\.1\.", "second")])
    assert all(k.endswith(".bias") for k in regex["bias"])
    assert regex["second"] == [k for k, _ in model.named_parameters() if ".h.1." in k and not k.endswith(".bias")]
    assert "transformer.wte.weight" not in {k for v in regex.values() for k in v}
    by_depth = group_parameters(model, lambda name: "deep" if ".h.1." in name else None)
    assert list(by_depth) == ["deep"] and len(by_depth["deep"]) == 12


def test_bad_grouping_is_named():
    with pytest.raises(ValueError, match="by must be one of"):
        group_parameters(gpt2(), "module")
    with pytest.raises(TypeError, match=r"\(regex, group\) pairs"):
        group_parameters(gpt2(), ["attn"])


# -- CNNs: the paper's Figure 4 components (Emb, Conv, BN, FC) and the ResNet stages, lower to upper ---------------


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, by hand (torchvision is not a dependency)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


class TorchvisionStyleResNet(nn.Module):
    """torchvision.models.ResNet's layout (conv1, bn1, layer1..layer4 of basic blocks, fc), 2 blocks a stage."""

    def __init__(self, widths=(4, 8, 8, 16), num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def hf_resnet():
    return transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic", num_labels=3
        )
    )


def test_torchvision_style_resnet_types_and_stages():
    model = TorchvisionStyleResNet()
    types = group_parameters(model, "type")
    _partition_ok(model, types)
    assert list(types) == ["embedding", "norm", "convolution", "feed_forward"]
    assert types["embedding"] == ["conv1.weight"]  # the stem; its BatchNorm is a norm
    assert types["feed_forward"] == ["fc.weight", "fc.bias"]
    norms = [k for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert types["norm"] == [f"{k}.{p}" for k in norms for p in ("weight", "bias")]
    assert "layer2.0.downsample.0.weight" in types["convolution"] and len(types["convolution"]) == 19
    layers = group_parameters(model, "layer")
    _partition_ok(model, layers)
    assert list(layers) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert layers["layer2"] == [k for k, _ in model.named_parameters() if k.startswith("layer2.")]


def test_transformers_resnet_types_and_stages():
    model = hf_resnet()
    types = group_parameters(model, "type")
    _partition_ok(model, types)
    assert {group: len(members) for group, members in types.items()} == {
        "embedding": 1,
        "norm": 12,
        "convolution": 5,
        "feed_forward": 2,
    }
    assert types["embedding"] == ["resnet.embedder.embedder.convolution.weight"]
    stem_norm = "resnet.embedder.embedder.normalization"
    assert types["norm"][:2] == [f"{stem_norm}.weight", f"{stem_norm}.bias"]
    assert "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight" in types["convolution"]
    assert types["feed_forward"] == ["classifier.1.weight", "classifier.1.bias"]
    layers = group_parameters(model, "layer")
    _partition_ok(model, layers)
    assert list(layers) == ["embedder", "encoder.stages.0", "encoder.stages.1", "classifier"]
    assert len(layers["encoder.stages.1"]) == 9  # two convolutions, the shortcut's, and their three BatchNorms


def test_cnn_lists_of_single_layers_keep_their_entries():
    # VGG's layout: two sibling Sequentials of single layers are not stages; a list without a stem conv has no stem
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    model.classifier = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2))
    assert list(group_parameters(model, "layer")) == ["features.0", "features.3", "classifier.0", "classifier.3"]
    assert list(group_parameters(model, "type")) == ["convolution", "feed_forward"]


def test_probe_by_type_and_layer_on_a_resnet():
    from acr_optim.probe import probe

    model = hf_resnet()
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    by_type = probe(model, batches, eps=0.5, p=float("inf"), n=10, by="type")
    assert [row["group"] for row in by_type.rows] == ["all", "embedding", "norm", "convolution", "feed_forward"]
    assert all(row["delta_loss"] > 0 for row in by_type.rows)
    by_layer = probe(model, batches, eps=0.5, p=float("inf"), n=10, by="layer", include_all=False)
    assert [row["group"] for row in by_layer.rows] == ["embedder", "encoder.stages.0", "encoder.stages.1", "classifier"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics included
