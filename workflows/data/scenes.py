"""Still images of the synthetic world: scenes of shapes (with captions and short-answer questions) and OCR words.

A scene is 1-3 *groups*; a group is 1-5 identical shapes (kind, colour, size) in one region of the picture (left,
right, top, bottom, center). Groups in a scene differ in kind, colour and region, so every question about "the red
circles" or "the star" has exactly one answer. Shapes sit in separate cells of a grid over their region, so they never
overlap and can be counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from workflows.data.world import (
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    noun,
    number_word,
    pick,
    pick_distinct,
    sentence_case,
)

RGB = tuple[int, int, int]
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (256, 256), (320, 240), (240, 320), (384, 288), (448, 336))
# Region boxes as fractions of (width, height): (x0, y0, x1, y1). They do not overlap.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.02, 0.22, 0.33, 0.78),
    "right": (0.67, 0.22, 0.98, 0.78),
    "top": (0.34, 0.02, 0.66, 0.33),
    "center": (0.34, 0.35, 0.66, 0.65),
    "bottom": (0.34, 0.67, 0.66, 0.98),
}
SIZE_FRACTION = {"small": 0.48, "big": 0.88}  # shape diameter as a fraction of its grid cell


@dataclass(frozen=True)
class ShapeGroup:
    """``count`` identical shapes in one region."""

    kind: str
    colour: str
    count: int
    position: str
    size: str

    def phrase(self) -> str:
        """ "two small red circles on the left"."""
        return (
            f"{number_word(self.count)} {self.size} {self.colour} {noun(self.kind, self.count)} "
            + (POSITION_PHRASES[self.position])
        )


@dataclass(frozen=True)
class Scene:
    """A picture: a plain background and 1-3 shape groups (distinct kinds, colours and regions)."""

    width: int
    height: int
    background: str
    groups: tuple[ShapeGroup, ...]

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene; groups are listed in caption order (left, top, center, bottom, right)."""
    width, height = pick(rng, IMAGE_SIZES)
    background = pick(rng, tuple(BACKGROUNDS))
    num_groups = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    kinds = pick_distinct(rng, SHAPES, num_groups)
    colours = pick_distinct(rng, [c for c in COLOURS if c != background], num_groups)
    positions = pick_distinct(rng, POSITIONS, num_groups)
    groups = [
        ShapeGroup(kind, colour, int(rng.integers(1, 6)), position, pick(rng, SIZES))
        for kind, colour, position in zip(kinds, colours, positions, strict=True)
    ]
    groups.sort(key=lambda g: POSITIONS.index(g.position))
    return Scene(width, height, background, tuple(groups))


def _star_points(cx: float, cy: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    """Draw one shape of radius ``r`` (half its extent) centred at (``cx``, ``cy``)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif kind == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(r * 0.32)))
    elif kind == "cross":
        t = r * 0.32
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def grid_cells(x0: float, y0: float, x1: float, y1: float, cells: int = 6) -> list[tuple[float, float, float]]:
    """Centres and size (cx, cy, side) of a grid of about ``cells`` square-ish cells over a box, row by row."""
    w, h = x1 - x0, y1 - y0
    cols = max(1, round(math.sqrt(cells * w / h)))
    rows = max(1, math.ceil(cells / cols))
    cw, ch = w / cols, h / rows
    side = min(cw, ch)
    return [(x0 + (c + 0.5) * cw, y0 + (r + 0.5) * ch, side) for r in range(rows) for c in range(cols)]


@dataclass(frozen=True)
class PlacedShape:
    """Where :func:`layout_scene` drew one shape of ``group``: centre (``cx``, ``cy``) and radius ``r``, in pixels."""

    group: ShapeGroup
    cx: float
    cy: float
    r: float


def layout_scene(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, list[PlacedShape]]:
    """Draw ``scene`` (as :func:`render_scene`, with the same draws of ``rng``) and say where each shape went."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    placed = []
    for group in scene.groups:
        fx0, fy0, fx1, fy1 = REGIONS[group.position]
        cells = grid_cells(fx0 * scene.width, fy0 * scene.height, fx1 * scene.width, fy1 * scene.height)
        chosen = rng.choice(len(cells), size=group.count, replace=False)
        for i in sorted(int(c) for c in chosen):
            cx, cy, side = cells[i]
            r = SIZE_FRACTION[group.size] * side / 2
            slack = max(0.0, side / 2 - r - 1)
            jx, jy = rng.uniform(-slack, slack, size=2) * 0.8
            draw_shape(draw, group.kind, cx + jx, cy + jy, r, COLOURS[group.colour])
            placed.append(PlacedShape(group, cx + jx, cy + jy, r))
    return img, placed


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene``: each group's shapes in random cells of its region's grid, with a little jitter."""
    return layout_scene(scene, rng)[0]


CAPTION_PROMPTS = ("Describe the image.", "Give a short caption of the image.", "What does the image show?")


def caption(scene: Scene) -> str:
    """The canonical caption: groups in region order, e.g. "one big blue star at the top and two small red circles
    on the right"."""
    return " and ".join(g.phrase() for g in scene.groups)


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def scene_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A short-answer question about ``scene`` and its answer (count, colour, shape, position, size, yes/no,
    background or total)."""
    group = pick(rng, scene.groups)
    the = f"the {group.colour} {noun(group.kind, group.count)}"
    kind = pick(rng, ("count", "count_kind", "colour", "shape", "position", "size", "exists", "background", "total"))
    if kind == "count":
        return f"How many {group.colour} {noun(group.kind, 2)} are there?", number_word(group.count)
    if kind == "count_kind":
        return f"How many {noun(group.kind, 2)} are there?", number_word(group.count)
    if kind == "colour":
        return f"What color {_be(group.count)} the {noun(group.kind, group.count)}?", group.colour
    if kind == "shape":
        objects = "object" if group.count == 1 else "objects"
        return f"What is the shape of the {group.colour} {objects}?", group.kind
    if kind == "position":
        return f"Where {_be(group.count)} {the}?", group.position
    if kind == "size":
        return f"{sentence_case(_be(group.count))} {the} big or small?", group.size
    if kind == "exists":
        if rng.random() < 0.5:
            return f"Is there a {group.colour} {group.kind}?", "yes"
        present = {(g.kind, g.colour) for g in scene.groups}
        absent = [(k, c) for k in SHAPES for c in COLOURS if (k, c) not in present]
        k, c = pick(rng, absent)
        return f"Is there a {c} {k}?", "no"
    if kind == "background":
        return "What color is the background?", scene.background
    return "How many shapes are there?", number_word(scene.total)


def scene_questions(scene: Scene, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` different questions about ``scene`` with their answers (the first is
    :func:`scene_question`'s; a repeat is drawn again, a few times per further question)."""
    pairs = [scene_question(scene, rng)]
    for _ in range(4 * (count - 1)):
        if len(pairs) == count:
            break
        question, answer = scene_question(scene, rng)
        if all(question != q for q, _ in pairs):
            pairs.append((question, answer))
    return pairs


# --- OCR: one short word rendered with Pillow's built-in scalable font ---------------------------------------------
OCR_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (256, 128), (320, 160), (320, 240), (384, 192), (448, 224))
OCR_BACKGROUNDS: dict[str, RGB] = {"white": (250, 250, 250), "cream": (245, 235, 205), "light": (215, 225, 235)}
OCR_INKS: tuple[str, ...] = ("black", "red", "blue", "green", "purple")
OCR_PROMPTS = ("What word is written in the image?", "Read the word in the image.", "What does the text say?")


def render_word(word: str, rng: np.random.Generator) -> Image.Image:
    """``word`` in dark ink on a light background, at a random size and place that keeps it whole.

    Uses ``ImageFont.load_default(size=...)`` (Pillow >= 10.1 with FreeType), so no font files are needed.
    """
    width, height = pick(rng, OCR_SIZES)
    img = Image.new("RGB", (width, height), OCR_BACKGROUNDS[pick(rng, tuple(OCR_BACKGROUNDS))])
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(max(16, height // 6), max(17, height // 2)))
    while True:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        if (right - left <= width * 0.9 and bottom - top <= height * 0.9) or size <= 10:
            break
        size = int(size * 0.85)
    x = rng.uniform(0.05 * width, max(0.05 * width, width * 0.95 - (right - left))) - left
    y = rng.uniform(0.05 * height, max(0.05 * height, height * 0.95 - (bottom - top))) - top
    draw.text((x, y), word, font=font, fill=COLOURS[pick(rng, OCR_INKS)])
    return img


def sample_word(rng: np.random.Generator) -> str:
    return pick(rng, WORDS)
