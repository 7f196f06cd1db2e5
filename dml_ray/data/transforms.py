"""Image decoding and the model-input transforms (resize shorter side, then crop)."""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

log = logging.getLogger(__name__)

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


class UniformAspectErasing(torch.nn.Module):
    """Random erasing with the aspect ratio drawn uniformly from [r, 1 / r] (Zhong et al. 2020, Alg. 1, as in
    the intra-batch-mpn authors' code and the [Re] paper's Sec. 3.2: "the area and the aspect ratio are picked
    uniformly at random"), up to 100 tries, filled with a constant per channel.

    Hand-written: torchvision's ``RandomErasing`` draws the log of the ratio uniformly (and tries 10 times),
    which makes elongated patches more frequent; its sampling is not configurable.
    """

    def __init__(self, p: float, scale: tuple[float, float] = ERASING_SCALE, min_ratio: float = ERASING_RATIO[0],
                 value: tuple[float, ...] = ERASING_VALUE, attempts: int = 100) -> None:
        super().__init__()
        self.p, self.scale, self.min_ratio, self.attempts = p, scale, min_ratio, attempts
        self.register_buffer("value", torch.tensor(value).view(-1, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Erase one patch of a C x H x W tensor in place with probability ``p``; return it."""
        if float(torch.rand(())) >= self.p:
            return image
        _, h, w = image.shape
        for _ in range(self.attempts):
            area = float(torch.empty(()).uniform_(*self.scale)) * h * w
            ratio = float(torch.empty(()).uniform_(self.min_ratio, 1 / self.min_ratio))
            eh, ew = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, ()))
                left = int(torch.randint(0, w - ew + 1, ()))
                image[:, top:top + eh, left:left + ew] = self.value.to(image.dtype)
                return image
        return image


# transforms that set the output size: their ``size`` defaults to data.image_size
SIZING_TRANSFORMS = ("RandomResizedCrop", "RandomCrop", "CenterCrop", "Resize")
# warn when the model input is this many times the images' shorter side (or more)
UPSAMPLE_WARNING = 2.0


def augmentation(name: str, params: Optional[dict[str, Any]] = None, image_size: Optional[int] = None) -> v2.Transform:
    """The torchvision.transforms.v2 transform ``name`` built with ``params`` (lists become tuples); a sizing
    transform (``SIZING_TRANSFORMS``) gets ``size=image_size`` unless ``params`` gives one."""
    cls = getattr(v2, name, None)
    if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
        raise ValueError(f"train.augmentations: {name!r} is not a torchvision.transforms.v2 transform")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (params or {}).items()}
    if name in SIZING_TRANSFORMS and "size" not in kwargs and image_size is not None:
        kwargs["size"] = image_size
    if name in ("RandomResizedCrop", "Resize"):
        kwargs.setdefault("antialias", True)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"train.augmentations: {name}({kwargs}): {err}") from None


DEFAULT_AUGMENTATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("RandomResizedCrop", {"scale": (0.3, 1.0)}), ("RandomHorizontalFlip", {}))


def train_transform(image_size: int, random_erasing: float = 0.0,
                    augmentations: Optional[Sequence[tuple[str, dict[str, Any]]]] = None,
                    resize: Optional[int] = None, erasing_aspect: str = "log_uniform") -> v2.Compose:
    """Training transform: the ``augmentations`` ((name, params) pairs of torchvision.transforms.v2; default: a
    random resized crop of 30-100 % of the area, then a horizontal flip) on the uint8 image, a center crop to
    ``image_size`` (a no-op after a sizing transform), normalisation, then random erasing with this probability,
    its aspect ratio drawn log-uniformly (torchvision) or uniformly (the intra-batch-mpn authors,
    ``UniformAspectErasing``).

    Without a sizing transform in the list the image is first resized to shorter side ``resize`` (default
    ``image_size``), as at inference.
    """
    augs = DEFAULT_AUGMENTATIONS if augmentations is None else augmentations
    steps: list[v2.Transform] = [v2.PILToTensor()]
    if not any(name in SIZING_TRANSFORMS for name, _ in augs):
        steps.append(v2.Resize(resize or image_size, antialias=True))
    steps += [augmentation(name, params, image_size) for name, params in augs]
    steps += [
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if random_erasing > 0 and erasing_aspect == "uniform":
        steps.append(UniformAspectErasing(random_erasing))
    elif random_erasing > 0 and erasing_aspect == "log_uniform":
        steps.append(v2.RandomErasing(random_erasing, ERASING_SCALE, ERASING_RATIO, list(ERASING_VALUE)))
    elif random_erasing > 0:
        raise ValueError(f"erasing_aspect: unknown {erasing_aspect!r}; expected one of: log_uniform, uniform")
    return v2.Compose(steps)


def upsampling_factor(widths: Sequence[int], heights: Sequence[int], resize: int, image_size: int) -> float:
    """How many times the model input side (``resize``, the shorter side at inference, or ``image_size`` if larger)
    exceeds the median shorter side of the images; 0 when no size is known."""
    w = np.asarray([x for x in widths if x], dtype=np.float64)
    h = np.asarray([x for x in heights if x], dtype=np.float64)
    if len(w) == 0 or len(w) != len(h):
        return 0.0
    return max(resize, image_size) / float(np.median(np.minimum(w, h)))


def warn_if_upsampling(widths: Sequence[int], heights: Sequence[int], resize: int, image_size: int) -> float:
    """Log a warning when ``upsampling_factor`` is ``UPSAMPLE_WARNING`` or more (blurry inputs, wasted compute);
    returns the factor."""
    factor = upsampling_factor(widths, heights, resize, image_size)
    if factor >= UPSAMPLE_WARNING:
        side = max(resize, image_size) / factor
        log.warning("data: resize %d / image_size %d upsample the images %.1f-fold (median shorter side %.0f px); "
                    "set data.resize and data.image_size closer to the images' size", resize, image_size, factor,
                    side)
    return factor
