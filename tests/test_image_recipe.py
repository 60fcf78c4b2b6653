"""recipes/image_classification.py: IDX files and hub datasets, the splits, the augmentation, errors, end to end."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch
from huggingface_hub import ModelCard

from acr_optim.errors import UsageError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FASHION_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"
sys.path.insert(0, str(RECIPES))

import image_classification as ic

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="../shared/data/fashion-mnist not available"
)


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, compress: bool = True) -> Path:
    """``array`` (uint8) as an IDX file: magic 0x0000080N, the N sizes big-endian, the bytes."""
    header = (magic or bytes([0, 0, 8, array.ndim])) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def idx_folder(folder: Path, n: int = 40, labels: int | None = None, compress: bool = True) -> Path:
    """A folder of n random 28x28 images and labels in 0..4 (``labels`` of them, if given), IDX files."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{ic.IDX_IMAGES}{suffix}", rng.integers(0, 256, (n, 28, 28)), compress=compress)
    write_idx(folder / f"{ic.IDX_LABELS}{suffix}", np.arange(labels or n) % 5, compress=compress)
    return folder


def args(**kwargs) -> ic.ImageArguments:
    return ic.ImageArguments(corruption_eval_faults=["none"], **kwargs)


# -- data ----------------------------------------------------------------------------------------


def test_idx_files_are_read_gzipped_or_not(tmp_path):
    for compress in (True, False):
        folder = idx_folder(tmp_path / str(compress), compress=compress)
        images, names = ic.idx_images(str(folder))
        assert images.pixels.shape == (40, 1, 28, 28) and images.pixels.dtype == torch.uint8
        assert images.labels.tolist() == [i % 5 for i in range(40)] and names == ["0", "1", "2", "3", "4"]
    raw = gzip.decompress((tmp_path / "True" / f"{ic.IDX_IMAGES}.gz").read_bytes())
    assert torch.equal(images.pixels.flatten(), torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8))


def test_bad_idx_input_stops_with_one_line_naming_the_flag_and_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, labels = f"{ic.IDX_IMAGES}.gz", f"{ic.IDX_LABELS}.gz"
    (tmp_path / "empty").mkdir()
    idx_folder(tmp_path / "counts", labels=39)
    magic = idx_folder(tmp_path / "magic")
    write_idx(magic / images, np.zeros((4, 28, 28)), magic=bytes([0, 0, 0x0D, 3]))  # floats, not bytes
    short = idx_folder(tmp_path / "short")
    (short / images).write_bytes(gzip.compress(gzip.decompress((short / images).read_bytes())[:-1]))
    broken = idx_folder(tmp_path / "broken")
    (broken / labels).write_bytes(b"not gzip at all")
    cases = [
        (["--data_dir", "nowhere"], "--data_dir nowhere: no such folder"),
        (["--data_dir", "empty"], f"--data_dir empty: no {ic.IDX_IMAGES}[.gz] in it"),
        (["--data_dir", "counts"], f"--data_dir counts/{images}: 40 images but {labels} has 39 labels"),
        (["--data_dir", "magic"], (f"--data_dir magic/{images}: not an IDX file of unsigned bytes with 3 "
         "dimension(s) (magic 00000d03, expected 00000803)")),
        (["--data_dir", "short"], f"--data_dir short/{images}: 31,359 bytes of data for 40 x 28 x 28 values"),
        (["--data_dir", "broken"], f"--data_dir broken/{labels}: cannot be read (Not a gzipped file (b'no'))"),
        (["--data_dir", "short", "--dataset_name", "x"], "give either --data_dir or --dataset_name, not both"),
        (["--image_column", "img"], "--image_column and --label_column name columns of --dataset_name"),
        (["--train_file", "train"], "--train_file does not apply to image classification"),
        (["--holdout_size", "0"], "--holdout_size must be >= 1, got 0"),
        (["--data_dir", "fine", "--holdout_size", "20"],
         "20 training images: too few to hold --holdout_size 20 out for validation"),
    ]  # fmt: skip
    idx_folder(tmp_path / "fine")
    for argv, message in cases:
        with pytest.raises(UsageError) as caught:
            ic.main([*argv, "--output_dir", str(tmp_path / "out")])
        assert str(caught.value) == message


def test_a_user_error_is_one_line_on_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, RECIPES / "image_classification.py", "--data_dir", "nowhere"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if ": error: " in line] == [
        "image_classification.py: error: --data_dir nowhere: no such folder"
    ]


@needs_fashion_mnist
def test_fashion_mnist_splits_are_fixed_by_split_seed_alone():
    splits, names = ic.load_images(args())
    sizes = {split: len(images) for split, images in splits.items()}
    assert sizes == {"train": 50000, "validation": 5000, "test": 5000}
    assert names == [str(i) for i in range(10)]
    again, _ = ic.load_images(args(max_eval_samples=100))
    assert torch.equal(again["test"].pixels, splits["test"].pixels)
    assert torch.equal(again["validation"].labels, splits["validation"].labels[:100])
    other, _ = ic.load_images(args(split_seed=1, max_predict_samples=100))
    assert not torch.equal(other["test"].labels, splits["test"].labels[:100])
    # test: 5,000 of a permutation drawn with --split_seed; validation: 5,000 of the rest, by the next permutation
    images, _ = ic.idx_images(str(FASHION_MNIST))
    generator = torch.Generator().manual_seed(0)
    rest = torch.randperm(60000, generator=generator)
    test, rest = rest[:5000], rest[5000:][torch.randperm(55000, generator=generator)]
    for split, index in [("test", test), ("validation", rest[:5000]), ("train", rest[5000:])]:
        assert torch.equal(splits[split].pixels, images.pixels[index])
        assert torch.equal(splits[split].labels, images.labels[index])
    assert len(set(torch.cat([test, rest]).tolist())) == 60000


def test_augmentation_crops_padded_images_and_flips_them():
    pixels = torch.arange(2 * 5 * 4, dtype=torch.uint8).reshape(1, 2, 5, 4).repeat(3, 1, 1, 1)
    images = ic.Images(pixels, torch.tensor([0, 1, 2]))
    mean, std = torch.tensor([0.1, 0.2])[:, None, None], torch.tensor([0.5, 0.25])[:, None, None]
    plain = ic.ImageClassificationDataset(images, mean, std, augment=False, padding=2, flip=True)
    assert torch.equal(plain[1]["pixel_values"], (pixels[1] / 255 - mean) / std) and plain[1]["labels"] == 1
    padded = torch.nn.functional.pad(pixels[0], (2, 2, 2, 2))
    candidates = [padded[:, top : top + 5, left : left + 4] for top in range(5) for left in range(5)]
    candidates += [c.flip(-1) for c in candidates]
    torch.manual_seed(0)
    augmented = ic.ImageClassificationDataset(images, mean, std, augment=True, padding=2, flip=True)
    seen = set()
    for _ in range(200):
        value = augmented[0]["pixel_values"] * std + mean
        (match,) = [i for i, c in enumerate(candidates) if torch.allclose(value, c / 255, atol=1e-6)]
        seen.add(match)
    assert len(seen) > 25 and any(i >= 25 for i in seen) and any(i < 25 for i in seen)  # shifts, flipped and not
    no_flip = ic.ImageClassificationDataset(images, mean, std, augment=True, padding=0, flip=False)
    assert torch.equal(no_flip[0]["pixel_values"], plain[0]["pixel_values"])


def test_images_fit_the_model_and_statistics_are_per_channel():
    pixels = torch.arange(2 * 28 * 28).reshape(2, 1, 28, 28).remainder(256).to(torch.uint8)
    gray = ic.Images(pixels, torch.tensor([0, 1]))
    rgb = ic.fit_images(gray, channels=3, size=None)
    assert rgb.pixels.shape == (2, 3, 28, 28)
    assert all(torch.equal(rgb.pixels[:, c], pixels[:, 0]) for c in range(3))
    assert ic.fit_images(gray, channels=1, size=32).pixels.shape == (2, 1, 32, 32)
    with pytest.raises(UsageError, match="the model takes 1-channel images; these have 3 channels"):
        ic.fit_images(rgb, channels=1, size=None)
    mean, std = ic.channel_statistics(rgb)
    values = gray.pixels.double().flatten() / 255
    assert mean.shape == (3, 1, 1) and torch.allclose(mean, values.mean().float().expand(3, 1, 1))
    assert torch.allclose(std, values.std().float().expand(3, 1, 1))


def test_default_model_has_the_small_stem_and_the_paper_groups():
    from acr_optim.probe import group_parameters

    model = ic.image_model(args(), names=[str(i) for i in range(10)], channels=1)
    assert model.num_parameters() == 1_228_394 and not model.accepts_loss_kwargs
    stem = model.resnet.embedder.embedder.convolution
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert isinstance(model.resnet.embedder.pooler, torch.nn.Identity)
    assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)
    assert list(group_parameters(model, "type")) == ["embedding", "norm", "convolution", "feed_forward"]
    stages = [f"encoder.stages.{i}" for i in range(4)]
    assert list(group_parameters(model, "layer")) == ["embedder", *stages, "classifier"]


def test_hub_dataset_columns_and_rgb_images(tmp_path):
    """``--dataset_name`` goes through ``datasets.load_dataset``: a local folder stands in for a hub repository."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    rows = {"img": [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(30)],
            "label": [i % 3 for i in range(30)]}  # fmt: skip
    features = Features({"img": Image(), "label": ClassLabel(names=["cat", "dog", "frog"])})
    Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
    splits, names = ic.load_images(args(dataset_name=str(tmp_path), holdout_size=5, max_train_samples=12))
    assert names == ["cat", "dog", "frog"]
    assert {split: tuple(images.pixels.shape) for split, images in splits.items()} == {
        "train": (12, 3, 32, 32),
        "validation": (5, 3, 32, 32),
        "test": (5, 3, 32, 32),
    }
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    first = np.asarray(rows["img"][order[0]]).transpose(2, 0, 1)
    assert np.array_equal(splits["test"].pixels[0].numpy(), first) and splits["test"].labels[0] == order[0] % 3
    for flag, value, message in [
        ("image_column", "pixels", "--image_column pixels: no such column in --dataset_name {}; "
         "its columns: img, label"),
        ("label_column", "img", "--label_column img of --dataset_name {}: not class ids "
         "(Image(mode=None, decode=True))"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as caught:
            ic.load_images(args(dataset_name=str(tmp_path), **{flag: value}))
        assert str(caught.value) == message.format(tmp_path)


# -- end to end ----------------------------------------------------------------------------------


@needs_fashion_mnist
def test_recipe_end_to_end_on_a_few_hundred_images(tmp_path, capsys):
    out = tmp_path / "ic"
    # fmt: off
    metrics = ic.main([
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "32",
        "--max_train_samples", "256", "--max_eval_samples", "128", "--max_predict_samples", "64",
        "--corruption_eval_eps", "0.5", "4", "--corruption_eval_faults", "int8", "prune:0.5",
    ])
    # fmt: on
    results = json.loads((out / "all_results.json").read_text())
    robustness = results["robustness"]
    assert [row["eps"] for row in robustness["rows"]] == [0.0, 0.5, 4.0]
    assert [row["accuracy"] for row in robustness["rows"]] == [
        results["eval_accuracy"],
        results["eval_corrupted_eps_0.5_accuracy"],
        results["eval_corrupted_eps_4_accuracy"],
    ]
    assert [(f["fault"], f["label"]) for f in robustness["faults"]] == [
        ("int8", "int8 weights, per channel"),
        ("prune:0.5", "50% magnitude pruning"),
    ]
    assert results["eval_corrupted_eps_4_loss"] > results["eval_corrupted_eps_0.5_loss"] > results["eval_loss"]
    # accuracy in %: a count of right answers out of the 128 validation and 64 test images
    for key, n in [("eval_accuracy", 128), ("eval_corrupted_eps_4_accuracy", 128), ("test_accuracy", 64)]:
        assert 0 <= results[key] <= 100 and results[key] * n / 100 == pytest.approx(round(results[key] * n / 100))
    assert metrics["eval_accuracy"] == results["eval_accuracy"]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert log[-1]["step"] == 3
    printed = capsys.readouterr().out
    assert "Image classification, validation accuracy in % (128 images)" in printed
    assert "training: ACR (eps=0.05, p=2, alpha=0.5), 256 images of 28x28" in printed
    assert "test accuracy:" in printed and "50% magnitude pruning" in printed
    # the card: accuracy results, the training settings, a usage snippet that loads the small-stem model and runs
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_type == "accuracy" and "image-classification" in card.data.tags
    assert card.data.eval_results[0].metric_value == float(f"{results['eval_accuracy']:.4g}")
    assert "| `horizontal_flip` | True |" in card.text and "| `image_size` | 28x28 |" in card.text
    usage = card.text.split("## How to use\n\n```python\n")[1].split("```")[0]
    exec(compile(usage, "usage", "exec"), {})  # noqa: S102 - running the card's own snippet is the test
    assert capsys.readouterr().out.strip() in [str(i) for i in range(10)]
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 28, "width": 28} and len(processor["image_mean"]) == 1


def test_fine_tuning_a_saved_model_replaces_its_head_and_fits_the_images(tmp_path, capsys):
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "tuned"
    # fmt: off
    ic.main([
        "--model_name_or_path", str(tmp_path / "pretrained"), "--data_dir", str(idx_folder(tmp_path / "idx", 60)),
        "--holdout_size", "10", "--image_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--corruption_eval_eps", "0.5", "--corruption_eval_faults", "none", "--output_dir", str(out),
    ])
    # fmt: on
    model = AutoModelForImageClassification.from_pretrained(out)  # the standard stem: from_pretrained loads it
    assert model.config.num_labels == 5 and model.config.id2label[4] == "4" and model.config.num_channels == 3
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and len(set(processor["image_mean"])) == 1  # gray x 3
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(tmp_path / "pretrained")
    usage = card.text.split("## How to use\n\n```python\n")[1].split("```")[0]
    assert 'Image.new("RGB", (32, 32))' in usage
    capsys.readouterr()
    exec(compile(usage, "usage", "exec"), {})  # noqa: S102 - running the card's own snippet is the test
    assert capsys.readouterr().out.strip() in [str(i) for i in range(5)]
