"""Image decoding and the model-input transforms (resize shorter side, then crop)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; Pillow's decompression-bomb limit stays in force."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def eval_transform(resize: int | Sequence[int], image_size: int) -> v2.Compose:
    """Deterministic inference transform: resize shorter side to ``resize`` (or to exactly (h, w) when it is
    a pair, ``DataConfig.input_resize``), center crop ``image_size``."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def display_view(image: Image.Image, resize: int | Sequence[int], image_size: int) -> torch.Tensor:
    """The model's input frame as uint8 H x W x 3 pixels (resize + center crop, no normalisation)."""
    view = v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return view(image).permute(1, 2, 0)


# intra-batch-mpn Sec. 3.2: erase 2-40 % of the area, aspect 0.3-3.3, fill (0.4914, 0.4822, 0.4465)
ERASING_SCALE = (0.02, 0.4)
ERASING_RATIO = (0.3, 3.3)
ERASING_VALUE = (0.4914, 0.4822, 0.4465)


def train_transform(image_size: int, random_erasing: float = 0.0) -> v2.Compose:
    """Training augmentation: random resized crop, horizontal flip, then random erasing with this probability."""
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(random_erasing, ERASING_SCALE, ERASING_RATIO, list(ERASING_VALUE)))
    return v2.Compose(steps)

