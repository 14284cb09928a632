"""A built-in data set: coloured shapes with captions, generated on the fly from a seed.

Enough to train a small CLIP on a CPU and to measure what it learned: one or two objects per
picture, ``SHAPES`` x ``COLOURS``, small to large, anywhere, on plain or lightly textured dark or
light backgrounds, captioned from several templates ("a small red circle above a blue square",
"a photo of a green star", ...).  Item ``i`` of seed ``s`` is always the same picture.

Two things are kept out of training on purpose, so that generalisation can be measured:

* ``HELD_OUT``: eight colour x shape pairs that never appear in training, in either object of
  any picture (each colour once, every training shape at least once); zero-shot accuracy on them
  measures whether the model composes colour and shape rather than memorising pairs.
* ``NOVEL_SHAPES`` (heart, crescent): shapes absent from the default training set, for teaching
  them later (textual inversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import BadInput

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "cyan": (30, 195, 215),
    "blue": (35, 65, 215),
    "purple": (135, 45, 190),
    "pink": (245, 120, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "heart", "crescent")
TRAIN_SHAPES = SHAPES[:6]
NOVEL_SHAPES = SHAPES[6:]
HELD_OUT = frozenset(
    {
        ("red", "star"),
        ("orange", "cross"),
        ("yellow", "circle"),
        ("green", "hexagon"),
        ("cyan", "triangle"),
        ("blue", "square"),
        ("purple", "star"),
        ("pink", "hexagon"),
    }
)

SINGLE_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "a drawing of {}",
    "{} on a {bg} background",
    "there is {} in the picture",
)
PAIR_TEMPLATES = {
    "above": "{} above {}",
    "below": "{} below {}",
    "left": "{} to the left of {}",
    "right": "{} to the right of {}",
    "and": "{} and {}",
}
ZERO_SHOT_TEMPLATES = ("{}", "a photo of {}", "a drawing of {}")
_SIZES = {"small": (0.11, 0.16), "": (0.18, 0.23), "large": (0.26, 0.33)}  # radius / image size
_PAIR_SIZES = {"small": (0.09, 0.13), "": (0.14, 0.17), "large": (0.18, 0.22)}
_SUPERSAMPLE = 4


def phrase(colour: str, shape: str, size: str = "") -> str:
    """'a small red circle', 'an orange star': the noun phrase captions and labels use."""
    words = " ".join(w for w in (size, colour, shape) if w)
    return ("an " if words[0] in "aeiou" else "a ") + words


def labels(shapes: Sequence[str] = TRAIN_SHAPES) -> list[tuple[str, str]]:
    """Every (colour, shape) pair over ``shapes``: the classes of the zero-shot evaluation."""
    return [(c, s) for s in shapes for c in COLOURS]


@dataclass(frozen=True)
class Thing:
    """One object of a picture: centre and radius in pixels, rotation in degrees."""

    colour: str
    shape: str
    size: str  # "small", "" (medium) or "large"
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str  # "dark" or "light"
    caption: str


class Shapes:
    """``length`` seeded pictures of ``size`` x ``size`` pixels with captions.

    ``shapes`` and ``exclude`` choose the colour x shape pairs drawn (by default the training
    shapes without ``HELD_OUT``); ``pair_p`` is the share of two-object pictures.

    ``partial_p`` is the share of one-object captions that name one attribute alone: half of
    them the shape ("a small circle"), half the colour ("a red shape"), so that each word is
    learned on its own and colour x shape pairs never seen together compose.

    ``shape_only`` captions name nothing but the shapes, with no template, size or colour
    ("a circle", "a star and a cross"): fixed, distinct targets that let an image tower learn
    shape before its text tower learns anything (``train``'s bootstrap phase).
    """

    def __init__(
        self,
        size: int = 64,
        seed: int = 0,
        length: int = 1_000_000,
        shapes: Sequence[str] = TRAIN_SHAPES,
        exclude: frozenset = HELD_OUT,
        pair_p: float = 0.3,
        partial_p: float = 0.0,
        shape_only: bool = False,
    ):
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise BadInput(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
        if size < 16:
            raise BadInput(f"pictures of {size} pixels are too small to draw shapes in; use 16 or more")
        if size > 4096:
            raise BadInput(f"pictures of {size} x {size} pixels are too large for shape pictures; use 4096 or less")
        if not (0 <= pair_p <= 1 and 0 <= partial_p <= 1):
            raise BadInput(f"pair_p and partial_p are shares: 0 to 1, got {pair_p} and {partial_p}")
        self.size, self.seed, self.length, self.pair_p, self.partial_p = size, seed, length, pair_p, partial_p
        self.shape_only = shape_only
        self.combos = [(c, s) for c, s in labels(shapes) if (c, s) not in exclude]
        if len(self.combos) < 2:
            raise BadInput("fewer than two colour x shape pairs are left to draw")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        scene = self.scene(index)
        return render(scene, self.size, self._rng(index, 1)), scene.caption

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return np.random.default_rng([self.seed, index, stream])

    def scene(self, index: int) -> Scene:
        """What picture ``index`` shows and says (drawing it is ``render``)."""
        scene = self._scene(index)
        if self.shape_only:
            return Scene(scene.things, scene.background, " and ".join(phrase("", t.shape) for t in scene.things))
        return scene

    def _scene(self, index: int) -> Scene:
        rng = self._rng(index, 0)
        background = "dark" if rng.random() < 0.5 else "light"
        if rng.random() >= self.pair_p:
            colour, shape = self.combos[rng.integers(len(self.combos))]
            thing = _place(rng, colour, shape, _SIZES, self.size, (0, 0, self.size, self.size))
            template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
            size = thing.size if rng.random() < 0.7 else ""
            words = phrase(colour, shape, size)
            if self.partial_p and rng.random() < self.partial_p:  # no draw when off: seeds keep their pictures
                words = phrase("", shape, size) if rng.random() < 0.5 else phrase(colour, "shape", size)
            return Scene((thing,), background, template.format(words, bg=background))
        (c1, s1), (c2, s2) = (self.combos[i] for i in rng.choice(len(self.combos), size=2, replace=False))
        s, h = self.size, self.size / 2
        vertical = rng.random() < 0.5
        boxes = ((0, 0, s, h), (0, h, s, s)) if vertical else ((0, 0, h, s), (h, 0, s, s))
        first = _place(rng, c1, s1, _PAIR_SIZES, s, boxes[0])  # top or left
        second = _place(rng, c2, s2, _PAIR_SIZES, s, boxes[1])
        sized = rng.random() < 0.5
        a, b = (phrase(t.colour, t.shape, t.size if sized else "") for t in (first, second))
        relation = ["above", "below", "and"][rng.integers(3)] if vertical else ["left", "right", "and"][rng.integers(3)]
        if relation in ("below", "right") or relation == "and" and rng.random() < 0.5:
            a, b = b, a
        return Scene((first, second), background, PAIR_TEMPLATES[relation].format(a, b))


def _place(
    rng: np.random.Generator, colour: str, shape: str, sizes: dict, image: int, box: tuple[float, float, float, float]
) -> Thing:
    """A thing of a random size class, wholly inside ``box``."""
    size = list(sizes)[rng.integers(len(sizes))]
    lo, hi = sizes[size]
    r = rng.uniform(lo, hi) * image
    x0, y0, x1, y1 = box
    x = rng.uniform(x0 + r + 1, max(x1 - r - 1, x0 + r + 1))
    y = rng.uniform(y0 + r + 1, max(y1 - r - 1, y0 + r + 1))
    angle = rng.uniform(-180, 180) if shape == "crescent" else rng.uniform(-25, 25)
    return Thing(colour, shape, size, float(x), float(y), float(r), float(angle))


def _outline(shape: str, angle: float) -> list[list[tuple[float, float]]]:
    """Polygons (unit radius, centred at 0) whose union is the shape; the crescent's second
    polygon is cut out of the first."""

    def ring(n: int, radius: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
        return [
            (radius * math.cos(math.radians(start + 360 * k / n)), radius * math.sin(math.radians(start + 360 * k / n)))
            for k in range(n)
        ]

    if shape in ("circle", "crescent"):
        polys = [ring(64)]
        if shape == "crescent":
            polys.append([(x * 0.85 + 0.45, y * 0.85) for x, y in ring(64)])
    elif shape == "square":
        polys = [ring(4, 1.2, -45)]
    elif shape == "triangle":
        polys = [[(x, y + 0.15) for x, y in ring(3, 1.2)]]
    elif shape == "star":
        polys = [[p for k, p in enumerate(ring(10, 1.15)) if k % 2 == 0 for p in (p, ring(10, 0.5, -54)[k])]]
    elif shape == "cross":
        w = 0.36
        polys = [
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        ]
    elif shape == "hexagon":
        polys = [ring(6, 1.05, 0)]
    else:  # heart
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        polys = [
            [
                (
                    16 * math.sin(t) ** 3 / 16,
                    -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16 + 0.1,
                )
                for t in ts
            ]
        ]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [[(x * c - y * s, x * s + y * c) for x, y in poly] for poly in polys]


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A dark or light grey, slightly tinted, plain or with faint noise, gradient or stripes."""
    level = rng.uniform(25, 80) if kind == "dark" else rng.uniform(170, 230)
    base = np.full((size, size, 3), level, dtype=np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
    texture = rng.integers(4)
    if texture == 1:
        base += rng.normal(0, 6, base.shape).astype(np.float32)
    elif texture == 2:
        ramp = np.linspace(-1, 1, size, dtype=np.float32) * rng.uniform(10, 25)
        base += (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])[..., None]
    elif texture == 3:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        theta, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        base += (6 * np.sin((x * math.cos(theta) + y * math.sin(theta)) * 2 * math.pi / period))[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene: antialiased shapes (drawn at 4x, averaged down), colours jittered a little."""
    image = Image.fromarray(_background(rng, scene.background, size))
    big = size * _SUPERSAMPLE
    for thing in scene.things:
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        for k, poly in enumerate(_outline(thing.shape, thing.angle)):
            points = [
                ((thing.x + x * thing.radius) * _SUPERSAMPLE, (thing.y + y * thing.radius) * _SUPERSAMPLE)
                for x, y in poly
            ]
            draw.polygon(points, fill=0 if k else 255)
        colour = np.clip(np.array(COLOURS[thing.colour]) + rng.integers(-18, 19, 3), 0, 255)
        image.paste(tuple(int(v) for v in colour), mask=mask.reduce(_SUPERSAMPLE))
    return image


def eval_set(split: str, n: int, size: int = 64, seed: int = 1234) -> list[tuple[Image.Image, str, str]]:
    """``n`` single-object pictures (image, colour, shape) for zero-shot evaluation, cycling through
    the ``"seen"`` training pairs or the ``"held_out"`` ones; a seed apart from training's."""
    if split == "seen":
        combos = [c for c in labels() if c not in HELD_OUT]
    elif split == "held_out":
        combos = sorted(HELD_OUT, key=labels().index)
    else:
        raise BadInput(f"unknown evaluation split {split!r}; use 'seen' or 'held_out'")
    return pictures(combos, n, size, seed)


def pictures(
    pairs: Sequence[tuple[str, str]], n: int, size: int = 64, seed: int = 1234
) -> list[tuple[Image.Image, str, str]]:
    """``n`` single-object pictures (image, colour, shape) cycling through the (colour, shape) ``pairs``,
    drawn as training draws them; any shape of ``SHAPES``, the novel ones included."""
    if not pairs:
        raise BadInput("no colour x shape pairs given")
    unknown = [p for p in pairs if p[0] not in COLOURS or p[1] not in SHAPES]
    if unknown:
        raise BadInput(
            f"unknown colour x shape pair {unknown[0]}; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"
        )
    out = []
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        rng = np.random.default_rng([seed, i, 2])
        thing = _place(rng, colour, shape, _SIZES, size, (0, 0, size, size))
        scene = Scene((thing,), "dark" if rng.random() < 0.5 else "light", phrase(colour, shape))
        out.append((render(scene, size, rng), colour, shape))
    return out
