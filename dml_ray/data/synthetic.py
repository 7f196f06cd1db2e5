"""A synthetic CUB-200-2011: learnable classes on cluttered backgrounds with exact boxes (DESIGN.md).

Class ``i`` (0-based) is the combination of a shape (``i mod 7``), a colour pattern (``i mod 4``),
a part (a dark knob on a stalk at one side, or none; ``i mod 5``) and a colour (``i mod 9``).
The moduli are pairwise coprime, so the first 7 * 4 * 5 * 9 = 1260 classes are all distinct
and consecutive classes differ in every attribute. Each image draws its class's object with a
random scale, aspect, rotation, position and colour jitter on low-contrast clutter plus noise;
the bounding box is the tight box of the object's drawn pixels, part included. Each image comes
from its own random stream seeded by (seed, class, image), so the output is a function of the
arguments alone.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from dml_ray.data.readers import Box, join, open_root

SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross", "ring", "diamond")
PATTERNS = ("solid", "stripes", "twotone", "dots")
PARTS = ("", "top", "right", "bottom", "left")
COLOURS = (
    ("red", (220, 40, 40)),
    ("orange", (240, 140, 20)),
    ("yellow", (230, 210, 30)),
    ("green", (40, 170, 60)),
    ("teal", (20, 170, 170)),
    ("blue", (40, 80, 220)),
    ("purple", (140, 60, 200)),
    ("pink", (240, 90, 180)),
    ("brown", (140, 85, 35)),
)
MAX_CLASSES = len(SHAPES) * len(PATTERNS) * len(PARTS) * len(COLOURS)
JPEG_QUALITY = 90
OBJECT_FRACTION = (0.3, 0.6)  # span of the object (part included) over the image side
_PART_DIRECTIONS = {"top": (0.0, -1.0), "right": (1.0, 0.0), "bottom": (0.0, 1.0), "left": (-1.0, 0.0)}


@dataclass(frozen=True)
class _ClassSpec:
    shape: str
    pattern: str
    part: str
    colour: str
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        words = [self.colour, self.pattern, self.shape] + ([self.part, "knob"] if self.part else [])
        return "_".join(word.capitalize() for word in words)


def _class_spec(index: int) -> _ClassSpec:
    colour, rgb = COLOURS[index % len(COLOURS)]
    return _ClassSpec(
        SHAPES[index % len(SHAPES)], PATTERNS[index % len(PATTERNS)], PARTS[index % len(PARTS)], colour, rgb
    )


# ---- geometry in the object's unit frame (radius about 1, y pointing down) ----


def _circle(n: int = 32, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _triangle() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(arm: float = 0.35) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=float,
    )


_SHAPE_OUTLINES = {
    "ellipse": _circle() * (1.0, 0.65),
    "rectangle": np.array([(-1, -0.6), (1, -0.6), (1, 0.6), (-1, 0.6)], dtype=float),
    "triangle": _triangle(),
    "star": _star(),
    "cross": _cross(),
    "ring": _circle(),
    "diamond": np.array([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], dtype=float),
}
_SHAPE_HOLES = {"ring": _circle(radius=0.55)}


def _pattern_polygons(pattern: str) -> list[np.ndarray]:
    """Polygons drawn in the secondary colour over the object, clipped to its outline."""
    if pattern == "stripes":
        return [np.array([(-2, y), (2, y), (2, y + 0.15), (-2, y + 0.15)]) for y in np.arange(-1.2, 1.2, 0.3)]
    if pattern == "twotone":
        return [np.array([(0, -2), (2, -2), (2, 2), (0, 2)], dtype=float)]
    if pattern == "dots":
        grid = np.arange(-0.9, 1.0, 0.45)
        return [_circle(8, 0.11, (x, y)) for x in grid for y in grid]
    return []


def _part_polygons(part: str) -> list[np.ndarray]:
    """A stalk from inside the object outwards and a knob at its end, towards side ``part``."""
    if not part:
        return []
    dx, dy = _PART_DIRECTIONS[part]
    normal = np.array([-dy, dx]) * 0.09
    start, end = np.array([dx, dy]) * 0.3, np.array([dx, dy]) * 1.3
    stalk = np.stack([start - normal, end - normal, end + normal, start + normal])
    return [stalk, _circle(16, 0.28, (end[0], end[1]))]


_PATTERN_POLYGONS = {pattern: _pattern_polygons(pattern) for pattern in PATTERNS}
_PART_POLYGONS = {part: _part_polygons(part) for part in PARTS}


@dataclass(frozen=True)
class _Placement:
    centre: tuple[float, float]
    radius: float
    aspect: tuple[float, float]
    angle: float

    def apply(self, points: np.ndarray) -> list[tuple[float, float]]:
        """Image coordinates of unit-frame ``points``: aspect, rotation, scale, translation."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        p = points * self.aspect
        rotated = np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], axis=1)
        return [tuple(xy) for xy in (rotated * self.radius + self.centre).tolist()]


def _placement(rng: np.random.Generator, size: int, extent: float) -> _Placement:
    """Random scale, aspect, rotation and a position keeping the whole object inside the image."""
    radius = rng.uniform(*OBJECT_FRACTION) * size / (1.0 + extent)
    aspect = rng.uniform(0.85, 1.15, 2)
    angle = rng.uniform(-0.4, 0.4)
    margin = min(extent * radius * aspect.max() + 1.0, size / 2)
    centre = rng.uniform(margin, size - margin, 2)
    return _Placement(
        (float(centre[0]), float(centre[1])), float(radius), (float(aspect[0]), float(aspect[1])), float(angle)
    )


# ---- rendering ----


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(np.round(values), 0, 255).astype(int).tolist()
    return (r, g, b)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-saturation clutter: a grey base with faint blobs and lines."""
    grey = rng.uniform(135.0, 185.0)

    def shade(spread: float) -> tuple[int, int, int]:
        return _rgb(grey + rng.uniform(-spread, spread) + rng.uniform(-6.0, 6.0, 3))

    image = Image.new("RGB", (size, size), shade(0.0))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 10))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=shade(22.0))
    for _ in range(int(rng.integers(3, 7))):
        draw.line(rng.uniform(0, size, 4).tolist(), fill=shade(22.0), width=int(rng.integers(1, 3)))
    return image


def _draw_object(image: Image.Image, spec: _ClassSpec, place: _Placement, rng: np.random.Generator) -> Image.Image:
    """Draw the object of class ``spec`` at ``place`` onto ``image``; return its mask (part included)."""
    size = image.size
    primary = np.array(spec.rgb) * rng.uniform(0.88, 1.12, 3)
    mask = Image.new("L", size, 0)
    mask_draw = ImageDraw.Draw(mask)
    mask_draw.polygon(place.apply(_SHAPE_OUTLINES[spec.shape]), fill=255)
    if spec.shape in _SHAPE_HOLES:
        mask_draw.polygon(place.apply(_SHAPE_HOLES[spec.shape]), fill=0)
    fill = Image.new("RGB", size, _rgb(primary))
    fill_draw = ImageDraw.Draw(fill)
    for polygon in _PATTERN_POLYGONS[spec.pattern]:
        fill_draw.polygon(place.apply(polygon), fill=_rgb(primary * 0.35))
    image.paste(fill, (0, 0), mask)
    draw = ImageDraw.Draw(image)
    part_colour = _rgb(np.full(3, 30.0) + rng.uniform(-8.0, 8.0, 3))
    for polygon in _PART_POLYGONS[spec.part]:
        draw.polygon(place.apply(polygon), fill=part_colour)
        mask_draw.polygon(place.apply(polygon), fill=255)
    return mask


def _with_noise(image: Image.Image, rng: np.random.Generator, sigma: float = 4.0) -> Image.Image:
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _render(spec: _ClassSpec, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box]:
    """One image of class ``spec`` and the tight box (x, y, w, h) of its object, part included."""
    image = _background(rng, size)
    extent = max(
        float(np.hypot(p[:, 0], p[:, 1]).max()) for p in [_SHAPE_OUTLINES[spec.shape], *_PART_POLYGONS[spec.part]]
    )
    mask = _draw_object(image, spec, _placement(rng, size, extent), rng)
    left, top, right, bottom = mask.getbbox()
    return _with_noise(image, rng), (float(left), float(top), float(right - left), float(bottom - top))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _check_arguments(n_classes: int, images_per_class: int, image_size: int, seed: int) -> None:
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic n_classes {n_classes} outside 1..{MAX_CLASSES}")
    if images_per_class < 1:
        raise ValueError(f"synthetic images_per_class {images_per_class} must be at least 1")
    if image_size < 16:
        raise ValueError(f"synthetic image_size {image_size} must be at least 16")
    if seed < 0:
        raise ValueError(f"synthetic seed {seed} must be non-negative")


def _lines(items: Any) -> str:
    return "".join(f"{item}\n" for item in items)


def _index_files(classes: list[str], rows: list[tuple[int, int, str, Box]], images_per_class: int) -> dict[str, str]:
    """The CUB-200-2011 index files (1-based ids) of ``rows`` = (image id, class id, path, box)."""
    half = images_per_class // 2  # the zero-shot protocol ignores these flags; CUB has about half
    return {
        "classes.txt": _lines(f"{c} {name}" for c, name in enumerate(classes, start=1)),
        "images.txt": _lines(f"{i} {path}" for i, _, path, _ in rows),
        "image_class_labels.txt": _lines(f"{i} {c}" for i, c, _, _ in rows),
        "train_test_split.txt": _lines(f"{i} {int((i - 1) % images_per_class < half)}" for i, *_ in rows),
        "bounding_boxes.txt": _lines(f"{i} {x:.1f} {y:.1f} {w:.1f} {h:.1f}" for i, _, _, (x, y, w, h) in rows),
    }


def generate_synthetic(
    root: str,
    n_classes: int = 20,
    images_per_class: int = 12,
    image_size: int = 96,
    seed: int = 0,
    storage_options: Optional[dict[str, Any]] = None,
) -> str:
    """Write a synthetic dataset in the CUB-200-2011 layout under the fsspec URI ``root``; return ``root``."""
    _check_arguments(n_classes, images_per_class, image_size, seed)
    fs, base = open_root(root, storage_options)
    width = max(3, len(str(n_classes)))
    classes = [f"{c + 1:0{width}d}.{_class_spec(c).name}" for c in range(n_classes)]
    rows: list[tuple[int, int, str, Box]] = []
    for c, folder in enumerate(classes):
        spec = _class_spec(c)
        fs.makedirs(join(base, "images", folder), exist_ok=True)
        files = {}
        for j in range(images_per_class):
            image, box = _render(spec, np.random.default_rng([seed, c, j]), image_size)
            path = f"{folder}/{spec.name}_{j + 1:04d}.jpg"
            files[join(base, "images", path)] = _jpeg(image)
            rows.append((len(rows) + 1, c + 1, path, box))
        fs.pipe(files)
    for name, text in _index_files(classes, rows, images_per_class).items():
        fs.pipe_file(join(base, name), text.encode("utf-8"))
    return root
