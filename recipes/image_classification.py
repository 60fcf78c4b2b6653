#!/usr/bin/env python
"""Image classification with ACR (or a baseline), evaluated with accuracy clean and under parameter
corruption.

With no arguments it trains a small ResNet from scratch (``transformers``' ``ResNetForImageClassification``:
basic blocks, one a stage, widths 32/64/128/256, 1.2M parameters, its stem a 3x3 stride-1 convolution
without max-pooling, see :func:`small_image_resnet`) on Fashion-MNIST, read from the IDX files in
``../shared/data/fashion-mnist`` and split with ``--split_seed`` into 50,000 training, 5,000 validation
and 5,000 test images::

    accelerate launch recipes/image_classification.py
    python recipes/image_classification.py --data_dir ../shared/data/fashion-mnist --max_steps 20 --output_dir /tmp/ic

``--data_dir`` is a folder holding ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``
(MNIST, Fashion-MNIST, KMNIST); its validation and test images, ``--holdout_size`` each, are held out
of those.  Hub datasets and models work as in the Hugging Face examples (a hub dataset's missing
validation or test split is held out of its training split the same way)::

    accelerate launch recipes/image_classification.py --dataset_name uoft-cs/cifar10
    accelerate launch recipes/image_classification.py --model_name_or_path microsoft/resnet-18 \\
        --dataset_name zalando-datasets/fashion_mnist --image_size 64 --learning_rate 1e-3

Training images are augmented as usual for 28x28 and 32x32 images: a random crop of the image padded
with ``--random_crop_padding`` zeros, and a horizontal flip of half of them (``--no_horizontal_flip``
for digits).  Pixels are scaled to [0, 1] and normalised with the training images' per-channel mean
and standard deviation, which the saved image processor repeats.  Every ``TrainingArguments`` option
works; the recipe's own defaults are the ``DEFAULTS`` below (AdamW, lr 4e-3 warmed up over 30 % of
the steps, then cosine decay: a one-cycle schedule).  Results go to ``output_dir``: the model and its
image processor, ``all_results.json``/``eval_results.json`` (accuracy in %, clean, under corruption,
see ``--corruption_eval_eps``, and under the ``--corruption_eval_faults``) and a model card
``README.md``.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import PartialState
from datasets import ClassLabel, Dataset, load_dataset
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    EvalPrediction,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

try:  # the PIL backend by name (transformers since its image-processor backends), silent without torchvision
    from transformers import ViTImageProcessorPil as ImageProcessor
except ImportError:  # earlier transformers 5 releases, where this is the PIL one
    from transformers import ViTImageProcessor as ImageProcessor

from _common import (
    DEFAULT_FAULTS,
    RecipeArguments,
    acr_optimizer,
    cut_to_limits,
    evaluate_robustness,
    evaluation_batches,
    fault_rows,
    parse_arguments,
    robustness_block,
    robustness_rows,
    summary,
    train_and_save,
    trainer_evaluation,
    trainer_training,
    write_card,
)

from acr_optim.errors import UsageError, exit_on_usage_error
from acr_optim.integrations.evaluate import accuracy

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
IDX_IMAGES, IDX_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
SPLITS = ("train", "validation", "test")

# The recipe's defaults for transformers' options and its own, in place of theirs (--help shows them); any can be
# overridden.
DEFAULTS = {
    "output_dir": "outputs/image_classification",
    "num_train_epochs": 3.0,
    "learning_rate": 4e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.3,  # below 1: a share of the steps
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 512,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    **({} if torch.cuda.is_available() else {"dataloader_pin_memory": False}),  # nothing to pin for on a CPU
    # The recipes' default faults with int4 per output channel, not in groups of 32: those cannot split the rows of
    # a stem convolution (1 x 3 x 3 weights a row here, 3 x 7 x 7 in an ImageNet ResNet).
    "corruption_eval_faults": [fault.replace("int4:g32", "int4") for fault in DEFAULT_FAULTS],
}

# The default model: transformers' ResNet with basic blocks, one a stage (its stem replaced, see small_image_resnet).
TINY_RESNET = {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "layer_type": "basic"}

# How to load and run the trained model, for its model card ({path}: its folder; {mode}: "L" or "RGB"; {size}: H, W).
USAGE = """from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{path}")
model = AutoModelForImageClassification.from_pretrained("{path}").eval()
image = Image.new("{mode}", ({size}))  # your image here
print(model.config.id2label[model(**processor(image, return_tensors="pt")).logits.argmax(-1).item()])"""

# The same for the default model, whose stem from_pretrained would build as the standard 7x7 stride-2 one.
SMALL_STEM_USAGE = """import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

config = AutoConfig.from_pretrained("{path}")
model = ResNetForImageClassification(config)
# its stem: a 3x3 stride-1 convolution without max-pooling (from_pretrained would build the 7x7 stride-2 one)
model.resnet.embedder.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1)
model.resnet.embedder.pooler = torch.nn.Identity()
model.load_state_dict(load_file("{path}/model.safetensors"))
model.eval()
processor = AutoImageProcessor.from_pretrained("{path}")
image = Image.new("{mode}", ({size}))  # your image here
print(model.config.id2label[model(**processor(image, return_tensors="pt")).logits.argmax(-1).item()])"""


@dataclass
class ImageDataArguments:
    """Where the images come from, how they are split and augmented: the recipe's own section of ``--help``."""

    _argument_group_name: ClassVar[str] = "images (default: Fashion-MNIST, IDX files in ../shared/data/fashion-mnist)"

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Folder of IDX files: {IDX_IMAGES}[.gz] and {IDX_LABELS}[.gz]; unset without --dataset_name: "
            f"{DEFAULT_DATA_DIR}."
        },
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of --dataset_name; unset: 'image' or 'img'."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Class column of --dataset_name; unset: 'label' or 'labels'."}
    )
    holdout_size: int = field(
        default=5000,
        metadata={
            "help": "Images held out of the training images for validation and for test, each, where the data has "
            "no such split (>= 1; here in place of --validation_split_percentage)."
        },
    )
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed drawing the held-out images, apart from --seed: runs of all seeds share a test set."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize the images to this square size (>= 8); unset: as stored. A ConvNeXt needs >= 32, a "
            "pretrained model does best near its own size."
        },
    )
    random_crop_padding: int = field(
        default=4,
        metadata={"help": "Augmentation: a random crop of each training image padded with this many zeros (0: none)."},
    )
    horizontal_flip: bool = field(
        default=True,
        metadata={"help": "Augmentation: flip half the training images horizontally (right for clothes, not digits)."},
    )


@dataclass
class ImageArguments(RecipeArguments, ImageDataArguments):
    """Every option of the recipe's own (``TrainingArguments`` aside), checked together."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag in ("tokenizer_name", "train_file", "validation_file", "test_file", "lora_r"):
            if getattr(self, flag) is not None:
                raise ValueError(f"--{flag} does not apply to image classification")
        if self.dataset_name and self.data_dir:
            raise ValueError("give either --data_dir or --dataset_name, not both")
        if not self.dataset_name:
            if self.image_column or self.label_column:
                raise ValueError("--image_column and --label_column name columns of --dataset_name")
            self.data_dir = self.data_dir or str(DEFAULT_DATA_DIR)
            if not Path(self.data_dir).expanduser().is_dir():
                raise ValueError(f"--data_dir {self.data_dir}: no such folder")
        if self.holdout_size < 1:
            raise ValueError(f"--holdout_size must be >= 1, got {self.holdout_size}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"--image_size must be >= 8, got {self.image_size}")
        if self.random_crop_padding < 0:
            raise ValueError(f"--random_crop_padding must be >= 0, got {self.random_crop_padding}")


# -- data ----------------------------------------------------------------------------------------


@dataclass
class Images:
    """Images (uint8, N x C x H x W) and their class ids (int64, N)."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]) -> Images:
        """The images at ``indices`` (as ``datasets.Dataset.select``)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return Images(self.pixels[index], self.labels[index])


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The array of an IDX file of unsigned bytes with ``ndim`` dimensions (gzip or not): a big-endian header,
    magic ``0x0000080N`` for N dimensions then N sizes, then the bytes.  Errors name ``--data_dir`` and the file."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a truncated gzip stream an EOFError
        raise UsageError(f"--data_dir {path}: cannot be read ({err})") from None
    magic = bytes([0, 0, 8, ndim])
    if data[:4] != magic:
        raise UsageError(
            f"--data_dir {path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {data[:4].hex() or 'missing'}, expected {magic.hex()})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"--data_dir {path}: the IDX header is cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != np.prod(shape):
        raise UsageError(
            f"--data_dir {path}: {len(data) - header:,} bytes of data for {' x '.join(map(str, shape))} values"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def idx_file(data_dir: Path, name: str) -> Path:
    """``data_dir/name`` or ``data_dir/name.gz``."""
    for path in (data_dir / name, data_dir / f"{name}.gz"):
        if path.is_file():
            return path
    raise UsageError(f"--data_dir {data_dir}: no {name}[.gz] in it")


def idx_images(data_dir: str) -> tuple[Images, list[str]]:
    """The images and labels of the IDX files in ``data_dir``, and the class names (the ids as strings)."""
    folder = Path(data_dir).expanduser()
    images_file, labels_file = idx_file(folder, IDX_IMAGES), idx_file(folder, IDX_LABELS)
    pixels, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(pixels) != len(labels):
        raise UsageError(
            f"--data_dir {images_file}: {len(pixels):,} images but {labels_file.name} has {len(labels):,} labels"
        )
    images = Images(torch.from_numpy(pixels.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return images, [str(i) for i in range(int(labels.max()) + 1)]


def pick_column(rows: Dataset, given: str | None, candidates: tuple[str, ...], flag: str, dataset: str) -> str:
    """``given`` (checked) or the first of ``candidates`` among the columns of ``rows``."""
    found = [given] if given else [c for c in candidates if c in rows.column_names][:1]
    if not found or found[0] not in rows.column_names:
        what = f"{flag} {given}: no such column" if given else f"no {' or '.join(candidates)} column (give {flag})"
        raise UsageError(f"{what} in --dataset_name {dataset}; its columns: {', '.join(rows.column_names)}")
    return found[0]


def hub_images(rows: Dataset, image_column: str, label_column: str, dataset: str) -> Images:
    """The PIL images of a hub split as pixels: 1 channel for grayscale images, 3 (RGB) for any other."""
    mode = "L" if rows[0][image_column].mode in ("1", "L", "I", "I;16") else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in rows[image_column]]
    sizes = sorted({array.shape[:2] for array in arrays})
    if len(sizes) > 1:
        raise UsageError(f"--dataset_name {dataset}: images of {len(sizes)} sizes ({sizes[0]}, {sizes[1]}, ...)")
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels.unsqueeze(1) if mode == "L" else pixels.permute(0, 3, 1, 2).contiguous()
    return Images(pixels, torch.tensor(rows[label_column], dtype=torch.int64))


def load_images(args: ImageArguments) -> tuple[dict[str, Images], list[str]]:
    """``{"train", "validation", "test"}`` images from ``--data_dir``'s IDX files or ``--dataset_name``, and the class
    names.  A missing validation or test split is ``--holdout_size`` images held out of the training images (drawn
    with ``--split_seed``); each split is then cut to its first ``--max_*_samples``."""
    if args.dataset_name:
        name = args.dataset_name
        with PartialState().main_process_first():  # one process builds the `datasets` cache, the others then read it
            raw = load_dataset(name, args.dataset_config_name)
        if "train" not in raw:
            raise UsageError(f"--dataset_name {name} has no train split (it has {sorted(raw)})")
        image_column = pick_column(raw["train"], args.image_column, ("image", "img"), "--image_column", name)
        label_column = pick_column(raw["train"], args.label_column, ("label", "labels"), "--label_column", name)
        feature = raw["train"].features[label_column]
        if not isinstance(feature, ClassLabel):
            raise UsageError(f"--label_column {label_column} of --dataset_name {name}: not class ids ({feature})")
        splits: dict[str, Any] = {split: raw[split] for split in SPLITS if split in raw}
        names = list(feature.names)
    else:
        train, names = idx_images(args.data_dir)
        splits = {"train": train}
    generator = torch.Generator().manual_seed(args.split_seed)
    for split in ("test", "validation"):
        if split not in splits:
            train = splits["train"]
            if len(train) <= args.holdout_size:
                raise UsageError(
                    f"{len(train):,} training images: too few to hold --holdout_size {args.holdout_size} "
                    f"out for {split}"
                )
            order = torch.randperm(len(train), generator=generator).tolist()
            splits[split] = train.select(order[: args.holdout_size])
            splits["train"] = train.select(order[args.holdout_size :])
    cut_to_limits(splits, args)
    if args.dataset_name:
        splits = {split: hub_images(rows, image_column, label_column, name) for split, rows in splits.items()}
    return splits, names


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``{"pixel_values", "labels"}`` items: the images scaled to [0, 1] and normalised per channel with ``mean`` and
    ``std`` (shape C x 1 x 1); with ``augment``, each first a random crop of the image padded with ``padding`` zeros
    and, with ``flip``, flipped horizontally half the time (torch's global generator draws)."""

    def __init__(
        self, images: Images, mean: torch.Tensor, std: torch.Tensor, *, augment: bool, padding: int, flip: bool
    ) -> None:
        self.images, self.mean, self.std = images, mean, std
        self.augment, self.padding, self.flip = augment, padding, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.images.pixels[index]
        if self.augment and self.padding:
            height, width = pixels.shape[1:]
            top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
            pixels = F.pad(pixels, (self.padding,) * 4)[:, top : top + height, left : left + width]
        if self.augment and self.flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": (pixels / 255 - self.mean) / self.std, "labels": self.images.labels[index]}


def fit_images(images: Images, channels: int, size: int | None) -> Images:
    """``images`` with ``channels`` channels (grayscale repeated for a 3-channel model) and, given ``size``, resized
    to ``size`` x ``size`` (bilinear, antialiased)."""
    pixels = images.pixels
    if pixels.shape[1] != channels:
        if pixels.shape[1] != 1:
            raise UsageError(f"the model takes {channels}-channel images; these have {pixels.shape[1]} channels")
        pixels = pixels.expand(-1, channels, -1, -1)
    if size is not None and pixels.shape[2:] != (size, size):
        pixels = torch.cat(  # in chunks: the float copy of a whole split can be large
            [
                F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True).round().to(torch.uint8)
                for chunk in pixels.split(1024)
            ]
        )
    return Images(pixels.contiguous(), images.labels)


def channel_statistics(images: Images) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the pixels scaled to [0, 1], each of shape C x 1 x 1."""
    values = images.pixels.transpose(0, 1).reshape(images.pixels.shape[1], -1).double() / 255
    return values.mean(1).float()[:, None, None], values.std(1).float()[:, None, None]


# -- model ---------------------------------------------------------------------------------------


def small_image_resnet(config: ResNetConfig) -> ResNetForImageClassification:
    """A ResNet for 28x28 and 32x32 images: its stem a 3x3 stride-1 convolution without max-pooling, in place of the
    7x7 stride-2 convolution and max-pool that shrink such images to 7x7 at once.

    ``from_pretrained`` builds the standard stem, so a saved model is rebuilt this way and its weights loaded
    into it: the model card shows how."""
    model = ResNetForImageClassification(config)
    stem = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1)
    stem.apply(model._init_weights)  # as the model initialises its other convolutions and norms
    model.resnet.embedder.embedder = stem
    model.resnet.embedder.pooler = nn.Identity()
    return model


def image_model(args: ImageArguments, names: list[str], channels: int) -> PreTrainedModel:
    """``--model_name_or_path`` with a new head for the classes ``names`` (ResNet, ConvNeXt, ...), a new model from
    ``--model_config``, or :func:`small_image_resnet` with :data:`TINY_RESNET`; new models take ``channels``."""
    classes = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }
    if args.model_name_or_path:
        try:
            model = AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, ignore_mismatched_sizes=True, **classes
            )
        except (OSError, ValueError) as err:  # not found, or not an image classifier
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--model_name_or_path {args.model_name_or_path}: {first}") from None
    elif args.model_config:
        config = AutoConfig.from_pretrained(args.model_config, num_channels=channels, **classes)
        model = AutoModelForImageClassification.from_config(config)
    else:
        model = small_image_resnet(ResNetConfig(**TINY_RESNET, num_channels=channels, **classes))
    # Image classifiers average their cross-entropy over the batch themselves and ignore num_items_in_batch, but
    # take **kwargs: without this the Trainer would skip its division by gradient_accumulation_steps.
    model.accepts_loss_kwargs = False
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, training_args = parse_arguments(
        ImageArguments, TrainingArguments, DEFAULTS, argv, description=__doc__.split("\n\n")[0]
    )
    set_seed(training_args.seed)

    # Data: uint8 images by split, fitted to the model's channels and --image_size, normalised by the training images.
    splits, names = load_images(args)
    model = image_model(args, names, channels=splits["train"].pixels.shape[1])
    splits = {split: fit_images(images, model.config.num_channels, args.image_size) for split, images in splits.items()}
    mean, std = channel_statistics(splits["train"])
    augmentation = {"random_crop_padding": args.random_crop_padding, "horizontal_flip": args.horizontal_flip}
    data = {
        split: ImageClassificationDataset(
            images, mean, std, augment=split == "train", padding=args.random_crop_padding, flip=args.horizontal_flip
        )
        for split, images in splits.items()
    }
    height, width = splits["train"].pixels.shape[2:]
    processor = ImageProcessor(
        size={"height": height, "width": width}, image_mean=mean.flatten().tolist(), image_std=std.flatten().tolist()
    )

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        return {"accuracy": 100 * accuracy(eval_pred.predictions.argmax(-1), eval_pred.label_ids)}

    # Training: ACR around AdamW, or the Trainer's own optimizer with --no_acr.
    optimizers, callbacks = acr_optimizer(model, args, training_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=processor,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        optimizers=optimizers,
        callbacks=callbacks,
    )
    train_metrics = train_and_save(trainer, training_args)

    # Evaluation: accuracy clean, under gradient-based corruption of the weights, and under real-world faults.
    batches = evaluation_batches(
        data["validation"], training_args.per_device_eval_batch_size, default_data_collator, training_args.device
    )
    evaluate = trainer_evaluation(trainer, data["validation"])
    metrics = evaluate_robustness(trainer.model, batches, evaluate, args, log=trainer.is_world_process_zero())
    trainer.save_metrics("eval", metrics)  # not printed: the summary below shows them as a table
    rows, faults = robustness_rows(metrics, "accuracy", args), fault_rows(metrics, "accuracy", args)
    trainer.save_metrics("robustness", {"robustness": robustness_block(rows, faults, "accuracy", args)})
    if len(data["test"]):
        test_metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)

    if trainer.is_world_process_zero():
        usage = SMALL_STEM_USAGE if not (args.model_name_or_path or args.model_config) else USAGE
        mode = "L" if model.config.num_channels == 1 else "RGB"
        write_card(
            training_args.output_dir,
            model,
            args,
            rows,
            faults,
            training=trainer_training(trainer) | {"image_size": f"{height}x{width}", **augmentation},
            what="An image classifier",
            local_dataset=Path(args.data_dir or "").name,
            task_type="image-classification",
            metric_type="accuracy",
            metric_name="Accuracy (%)",
            language=None,
            usage=usage.replace("{mode}", mode).replace("{size}", f"{width}, {height}"),
            test_result=metrics.get("test_accuracy"),
        )
        lines = [
            (
                f"training: {args.training_kind}, {len(data['train']):,} images of {height}x{width}, "
                f"{train_metrics['train_runtime']:.0f} s"
            ),
            f"model:    {type(model).__name__}, {model.num_parameters():,} parameters",
        ]
        if "test_accuracy" in metrics:
            lines.append(f"test accuracy: {metrics['test_accuracy']:.2f} % ({len(data['test']):,} images)")
        lines.append(f"results:  {training_args.output_dir}")
        title = f"Image classification, validation accuracy in % ({len(data['validation']):,} images)"
        print(summary(title, lines, rows, faults, "Accuracy", args))
    return metrics


if __name__ == "__main__":
    exit_on_usage_error("image_classification.py", main)
