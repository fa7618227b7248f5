"""Procedural renders of one coloured shape, with captions from a small grammar.

Every concept dimension is exact: shape (circle, square, triangle, cross), colour (red, green,
blue, yellow) and style (filled, outlined). Colours and shapes have synonyms and indirect
phrasings that appear in training captions, so paraphrase prompts exist that avoid the
concept's own word (the analogue of I2P's implicit prompts).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
STYLES = ("filled", "outlined")
DIMENSIONS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}

RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 65, 215),
    "yellow": (235, 200, 25),
}

# Words a caption may use for a concept: the name, synonyms, and indirect phrasings.
COLOUR_SYNONYMS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
}
COLOUR_INDIRECT = {
    "red": ("the colour of blood", "the colour of a ripe tomato"),
    "green": ("the colour of fresh grass", "the colour of a leaf"),
    "blue": ("the colour of the clear sky", "the colour of the deep sea"),
    "yellow": ("the colour of the sun", "the colour of a banana"),
}
SHAPE_SYNONYMS = {
    "circle": ("disc", "round shape"),
    "square": ("box", "four-sided block"),
    "triangle": ("three-sided shape", "wedge"),
    "cross": ("plus sign", "plus shape"),
}
SHAPE_INDIRECT = {
    "circle": ("shaped like a coin", "shaped like the full moon"),
    "square": ("shaped like a chessboard tile", "shaped like a dice face"),
    "triangle": ("shaped like a pyramid", "shaped like a slice of pizza"),
    "cross": ("shaped like a hospital sign", "shaped like a crossroads"),
}


def prompt_labels(prompt: str) -> dict[str, str]:
    """The attributes a prompt names with their canonical words, e.g. "a red circle" ->
    {"colour": "red", "shape": "circle"} (synonyms and indirect phrasings are not read)."""
    words = set(prompt.lower().replace(",", " ").split())
    labels = {}
    for dim, values in DIMENSIONS.items():
        named = [v for v in values if v in words]
        if len(named) == 1:
            labels[dim] = named[0]
    return labels


STYLE_WORDS = {"filled": ("solid", "filled"), "outlined": ("outlined", "hollow")}

# Templates with {c} = colour adjective, {s} = shape noun, {t} = style word (may be absent).
TEMPLATES = (
    "a {t}{c} {s}",
    "a {t}{c} {s} on a white background",
    "a picture of a {t}{c} {s}",
    "a drawing of a {t}{c} {s}",
    "{t}{c} {s}",
    "an image showing a {t}{c} {s}",
)
# Templates for indirect colour ({ci}) or indirect shape ({si}) phrasings.
INDIRECT_COLOUR_TEMPLATES = ("a {t}{s} the colour of {ci}", "a {t}{s}, {cl}")
INDIRECT_SHAPE_TEMPLATES = ("a {t}{c} shape {si}", "something {t}{c}, {si}")


@dataclass(frozen=True)
class Scene:
    """What one image shows: the exact concept labels and the geometry."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]

    @property
    def labels(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "style": self.style}


def prompt_attributes(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, by canonical word, synonym or indirect phrasing of the
    caption grammar (e.g. "a hollow crimson disc" -> outlined, red, circle); a dimension named
    ambiguously (two values) is left out."""
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    words = {
        "colour": {c: (c, *COLOUR_SYNONYMS[c], *COLOUR_INDIRECT[c]) for c in COLOURS},
        "shape": {s: (s, *SHAPE_SYNONYMS[s], *SHAPE_INDIRECT[s]) for s in SHAPES},
        "style": {"filled": STYLE_WORDS["filled"], "outlined": STYLE_WORDS["outlined"]},
    }
    named = {}
    for dim, values in words.items():
        hits = [v for v, phrases in values.items() if any(f" {w} " in text for w in phrases)]
        if len(hits) == 1:
            named[dim] = hits[0]
    return named


def prompt_scene(prompt: str, rng: random.Random) -> Scene:
    """A random scene showing what ``prompt`` names (unnamed shape or colour drawn at random;
    an unmarked style is filled, as in the captions the world was trained on)."""
    named = prompt_attributes(prompt)
    if "shape" not in named and "colour" not in named:
        raise ValueError(f"the prompt names no world shape or colour: {prompt!r}")
    pick = {d: (named[d],) if d in named else values for d, values in DIMENSIONS.items()}
    return sample_scene(rng, pick["shape"], pick["colour"], (named.get("style", "filled"),))


def sample_scene(
    rng: random.Random,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOURS,
    styles: tuple[str, ...] = STYLES,
) -> Scene:
    """A random scene over the given concept values (e.g. without 'red' for a reference)."""
    radius = rng.uniform(7.0, 12.5)
    margin = radius + 1.5
    base = RGB[colour := rng.choice(colours)]
    rgb = tuple(int(min(255, max(0, v + rng.randint(-18, 18)))) for v in base)
    grey = rng.randint(235, 255)
    return Scene(
        shape=rng.choice(shapes),
        colour=colour,
        style=rng.choice(styles),
        cx=rng.uniform(margin, SIZE - margin),
        cy=rng.uniform(margin, SIZE - margin),
        radius=radius,
        angle=rng.uniform(-0.25, 0.25),
        rgb=rgb,  # type: ignore[arg-type]
        background=(grey, grey, grey),
    )


# Detector-only renders: shapes and colours outside the world, which the world classifier learns
# to call "none" (it must be able to abstain, not force a blend or a blob into a class).
DISTRACTOR_SHAPES = ("pentagon", "hexagon", "star", "ellipse", "bar", "blank")


def off_palette_rgb(rng: random.Random, min_distance: float = 90.0) -> tuple[int, int, int]:
    """A colour at least ``min_distance`` (RGB Euclidean) from every palette colour: half the
    time a blend of two palette colours, otherwise uniform over the RGB cube (greys, browns,
    purples, oranges, pastels...)."""
    while True:
        if rng.random() < 0.5:
            a, b = rng.sample(COLOURS, 2)
            t = rng.uniform(0.3, 0.7)
            rgb = tuple(
                int(round((1 - t) * x + t * y)) for x, y in zip(RGB[a], RGB[b], strict=True)
            )
        else:
            rgb = tuple(rng.randint(0, 255) for _ in range(3))
        if palette_distance(rgb) >= min_distance and min(rgb) < 225:  # not the background
            return rgb  # type: ignore[return-value]


def palette_distance(rgb) -> float:
    """RGB Euclidean distance to the nearest palette colour."""
    return min(math.dist(rgb, RGB[c]) for c in COLOURS)


def _polygon(scene: Scene, s: float) -> list[tuple[float, float]]:
    cx, cy, r, a = scene.cx * s, scene.cy * s, scene.radius * s, scene.angle
    if scene.shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r *= 0.8
    elif scene.shape == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.15) for x, y in pts]
    elif scene.shape in ("pentagon", "hexagon"):
        k = 5 if scene.shape == "pentagon" else 6
        angles = [2 * math.pi * i / k - math.pi / 2 for i in range(k)]
        pts = [(math.cos(t), math.sin(t)) for t in angles]
    elif scene.shape == "star":
        radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
        angles = [math.pi * i / 5 - math.pi / 2 for i in range(10)]
        pts = [(r * math.cos(t), r * math.sin(t)) for r, t in zip(radii, angles, strict=True)]
    elif scene.shape == "bar":
        pts = [(-1, -0.22), (1, -0.22), (1, 0.22), (-1, 0.22)]
    else:  # cross: a plus sign, arms a third of the width
        w = 1 / 3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
               (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def render(scene: Scene) -> Image.Image:
    """Draw the scene at 4x and downsample (anti-aliased) to 32x32 RGB."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), scene.background)
    draw = ImageDraw.Draw(img)
    width = int(round(2.2 * s))
    fill = scene.rgb if scene.style == "filled" else None
    outline = scene.rgb
    if scene.shape == "blank":
        pass
    elif scene.shape in ("circle", "ellipse"):
        r = scene.radius * s
        ry = r if scene.shape == "circle" else r * 0.45
        box = (scene.cx * s - r, scene.cy * s - ry, scene.cx * s + r, scene.cy * s + ry)
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        pts = _polygon(scene, s)
        if fill is not None:
            draw.polygon(pts, fill=fill)
        else:
            draw.line([*pts, pts[0], pts[1]], fill=outline, width=width, joint="curve")
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def caption(scene: Scene, rng: random.Random, indirect_rate: float = 0.25) -> str:
    """A caption from the grammar; with probability ``indirect_rate`` one concept is paraphrased
    indirectly, otherwise colour and shape words are drawn from name + synonyms."""
    colour_word = rng.choice((scene.colour, scene.colour, *COLOUR_SYNONYMS[scene.colour]))
    shape_word = rng.choice((scene.shape, scene.shape, *SHAPE_SYNONYMS[scene.shape]))
    if scene.style == "outlined":
        style = rng.choice(STYLE_WORDS["outlined"]) + " "
    else:  # unmarked captions mean filled; sometimes the word is said
        style = rng.choice(STYLE_WORDS["filled"]) + " " if rng.random() < 0.3 else ""
    roll = rng.random()
    if roll < indirect_rate / 2:
        phrase = rng.choice(COLOUR_INDIRECT[scene.colour])
        template = rng.choice(INDIRECT_COLOUR_TEMPLATES)
        text = template.format(t=style, s=shape_word, ci=phrase.removeprefix("the colour of "),
                               cl=phrase)  # fmt: skip
    elif roll < indirect_rate:
        template = rng.choice(INDIRECT_SHAPE_TEMPLATES)
        text = template.format(t=style, c=colour_word, si=rng.choice(SHAPE_INDIRECT[scene.shape]))
    else:
        text = rng.choice(TEMPLATES).format(t=style, c=colour_word, s=shape_word)
    words = text.split()
    for i in range(len(words) - 1):  # "a outlined" -> "an outlined"
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def render_dataset(
    n: int,
    seed: int,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOURS,
    styles: tuple[str, ...] = STYLES,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n renders as uint8 (n, 32, 32, 3), their captions and scenes; deterministic in seed."""
    rng = random.Random(seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = sample_scene(rng, shapes, colours, styles)
        images[i] = np.asarray(render(scene))
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes
