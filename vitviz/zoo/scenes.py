"""Procedural scenes with known ground truth: shapes on cluttered, textured backgrounds.

Every scene is a pure function of its seed (``numpy.random.default_rng(seed)``): the same
seed gives the same pixels, classes, masks and caption, whatever was generated before
(the tests pin the captions and classes of fixed seeds). Two kinds:

* :func:`classification_scene`: one shape (circle, square, triangle, star, cross, diamond)
  in one of six colours, size and position random, on a background of colour gradients,
  smooth colour noise, pixel noise and distractor strokes. The class is the shape.
* :func:`caption_scene`: two shapes (different colours *and* different shapes, so every
  colour and shape word names exactly one object), the larger one first, described as
  ``"a red star above a blue circle"``. The relation (above, below, left of, right of) is
  the dominant axis of the displacement between the centres, which is at least 1.6 times
  the other axis, so the caption is never ambiguous.

Shapes are drawn with 4x supersampling: the *coverage* of a pixel (the share of its 16
sub-pixels inside the shape) blends the shape's flat colour over the background,
``image = background * (1 - coverage) + colour * coverage`` (rounded to uint8). A pixel is
in the object's **mask** when its coverage is at least 0.5. Consequently, pixels with
coverage 1 have exactly the object's colour and pixels with coverage 0 are exactly the
background: :attr:`Scene.background` holds the scene without its objects.

Example:
    >>> s = caption_scene(7)
    >>> s.caption, s.image.shape, s.masks.shape
    ('a purple triangle above a green cross', (64, 64, 3), (2, 64, 64))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..models.bundled.vocabulary import COLOURS, IMAGE_SIZE, SHAPES

SUPERSAMPLE = 4
MASK_COVERAGE = 0.5  # a pixel belongs to the object's mask from this coverage on


@dataclass
class SceneObject:
    """One shape in a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        center: ``(x, y)`` in pixels (x to the right, y down).
        size: diameter of the circle around the shape, in pixels.
        angle: rotation in degrees.
        coverage: ``[H, W]`` float32 in ``[0, 1]``, the share of each pixel inside the shape.
    """

    shape: str
    colour: str
    center: tuple[float, float]
    size: float
    angle: float
    coverage: np.ndarray = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """``[H, W]`` bool: pixels at least half covered by the shape."""
        return self.coverage >= MASK_COVERAGE


@dataclass
class Scene:
    """An image with its ground truth.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        background: ``[H, W, 3]`` uint8 RGB, the same scene without its objects.
        objects: the shapes, in the order the caption names them.
        label: class index into :data:`SHAPES` (the shape of ``objects[0]``).
        words: the caption's words (``"left of"`` is two words).
        word_objects: for each word, the index of the object it names (colour and shape
            words), or ``None`` (articles and relation words).
        seed: the seed that made the scene.
    """

    image: np.ndarray = field(repr=False)
    background: np.ndarray = field(repr=False)
    objects: list[SceneObject]
    label: int
    words: list[str]
    word_objects: list[int | None]
    seed: int

    @property
    def caption(self) -> str:
        return " ".join(self.words)

    @property
    def label_name(self) -> str:
        return SHAPES[self.label]

    @property
    def masks(self) -> np.ndarray:
        """``[K, H, W]`` bool, one mask per object."""
        return np.stack([o.mask for o in self.objects])

    @property
    def mask(self) -> np.ndarray:
        """``[H, W]`` bool mask of the first object (the classification target)."""
        return self.objects[0].mask

    def word_masks(self) -> list[np.ndarray | None]:
        """The mask of the object each caption word names.

        Returns:
            One entry per word of :attr:`words`: the ``[H, W]`` bool mask of the object it
            names, or ``None`` (articles and relation words).
        """
        return [None if k is None else self.objects[k].mask for k in self.word_objects]


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

def _rotate(points: np.ndarray, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T


def shape_outline(shape: str, size: float, angle: float = 0.0, n_circle: int = 96) -> np.ndarray:
    """The outline of a shape centred at the origin.

    The circle's outline is a polygon; :func:`coverage` draws the exact disc.

    Args:
        shape: one of :data:`SHAPES`.
        size: the circumscribed diameter in pixels.
        angle: rotation in degrees.
        n_circle: vertices of the circle's polygon.

    Returns:
        ``[V, 2]`` float64 vertices ``(x, y)``.

    Raises:
        ValueError: an unknown shape.
    """
    r = size / 2.0
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, n_circle, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "square":
        h = r / math.sqrt(2)
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":  # equilateral, apex up
        t = np.array([-90.0, 30.0, 150.0]) * math.pi / 180
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "star":  # five points, inner radius 0.45 r
        t = (np.arange(10) * 36.0 - 90.0) * math.pi / 180
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    elif shape == "cross":  # a plus sign; arm half-width 0.3 r, so the corners reach r
        w, arm = 0.3 * r, math.sqrt(r * r - (0.3 * r) ** 2)
        pts = np.array([[-w, -arm], [w, -arm], [w, -w], [arm, -w], [arm, w], [w, w], [w, arm], [-w, arm],
                        [-w, w], [-arm, w], [-arm, -w], [-w, -w]])
    elif shape == "diamond":  # a rhombus, taller than wide
        pts = np.array([[0, -r], [0.62 * r, 0], [0, r], [-0.62 * r, 0]])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return _rotate(pts.astype(np.float64), angle)


def shape_area(shape: str, size: float) -> float:
    """The exact area of a shape (rotation does not change it).

    Args:
        shape: one of :data:`SHAPES`.
        size: the circumscribed diameter in pixels.

    Returns:
        The area in pixels².

    Raises:
        ValueError: an unknown shape.
    """
    if shape == "circle":
        return math.pi * (size / 2.0) ** 2
    pts = shape_outline(shape, size)
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _inside(shape: str, size: float, px: np.ndarray, py: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """Whether points (relative to the shape's centre) lie inside the shape (even-odd rule)."""
    if shape == "circle":
        return px * px + py * py <= (size / 2.0) ** 2
    x0, y0 = outline[:, 0], outline[:, 1]  # [V]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # [V]
    p_x, p_y = px[..., None], py[..., None]  # [..., 1]
    crosses = (y0 > p_y) != (y1 > p_y)  # [..., V]
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (p_y - y0) * (x1 - x0) / (y1 - y0)  # [..., V]
    return np.logical_xor.reduce(crosses & (p_x < x_at), axis=-1)


def coverage(shape: str, size: float, center: Sequence[float], angle: float = 0.0, h: int = IMAGE_SIZE,
             w: int = IMAGE_SIZE, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Share of every pixel inside a shape: ``ss x ss`` sub-pixel centres tested exactly.

    Pixel ``(i, j)`` spans ``[j, j+1] x [i, i+1]``; its sub-pixel centres are at
    ``j + (k + 0.5) / ss``. The circle is an exact disc; the other shapes are the polygons
    of :func:`shape_outline`.

    Args:
        shape: one of :data:`SHAPES`.
        size: the circumscribed diameter in pixels.
        center: ``(x, y)`` of the shape's centre in pixels.
        angle: rotation in degrees.
        h, w: the image size.
        ss: sub-pixels per side.

    Returns:
        ``[h, w]`` float32 in ``[0, 1]``.

    Raises:
        ValueError: an unknown shape.
    """
    out = np.zeros((h, w), dtype=np.float32)
    r = size / 2.0
    cx, cy = float(center[0]), float(center[1])
    j0, j1 = max(0, int(math.floor(cx - r)) - 1), min(w, int(math.ceil(cx + r)) + 1)
    i0, i1 = max(0, int(math.floor(cy - r)) - 1), min(h, int(math.ceil(cy + r)) + 1)
    if j0 >= j1 or i0 >= i1:
        return out
    sub = (np.arange(ss) + 0.5) / ss  # [ss]
    xs = (np.arange(j0, j1)[:, None] + sub).reshape(-1) - cx  # [(j1-j0)*ss]
    ys = (np.arange(i0, i1)[:, None] + sub).reshape(-1) - cy  # [(i1-i0)*ss]
    py, px = np.meshgrid(ys, xs, indexing="ij")  # [Hs, Ws]
    inside = _inside(shape, size, px, py, shape_outline(shape, size, angle))  # [Hs, Ws]
    out[i0:i1, j0:j1] = inside.reshape(i1 - i0, ss, j1 - j0, ss).mean(axis=(1, 3))
    return out


def _stroke_coverage(rng: np.random.Generator, h: int, w: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage ``[h, w]`` of one random distractor stroke: a line, a polyline or an arc."""
    canvas = Image.new("L", (w * ss, h * ss), 0)
    d = ImageDraw.Draw(canvas)
    width = int(rng.integers(1, 3)) * ss
    kind = rng.integers(0, 3)
    if kind == 0:
        p = rng.uniform(-4, [w + 4, h + 4, w + 4, h + 4]) * ss
        d.line([tuple(p[:2]), tuple(p[2:])], fill=255, width=width)
    elif kind == 1:
        n = int(rng.integers(3, 5))
        p = rng.uniform(0, [w, h], size=(n, 2)) * ss
        d.line([tuple(q) for q in p], fill=255, width=width, joint="curve")
    else:
        c = rng.uniform(0, [w, h]) * ss
        rad = rng.uniform(6, 22) * ss
        a0 = rng.uniform(0, 360)
        d.arc([c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad], a0, a0 + rng.uniform(60, 240),
              fill=255, width=width)
    return np.asarray(canvas, dtype=np.float32).reshape(h, ss, w, ss).mean(axis=(1, 3)) / 255.0


def _blend(img: np.ndarray, cov: np.ndarray, colour) -> np.ndarray:
    c = np.asarray(colour, dtype=np.float32)  # [3]
    return img * (1.0 - cov[..., None]) + c * cov[..., None]


# ---------------------------------------------------------------------------------------------
# backgrounds
# ---------------------------------------------------------------------------------------------

def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A dull colour: a random RGB pulled two thirds of the way to a random grey."""
    c = rng.uniform(40, 215, size=3)
    grey = rng.uniform(70, 170)
    return grey + (c - grey) * rng.uniform(0.15, 0.45)


def background(rng: np.random.Generator, h: int = IMAGE_SIZE, w: int = IMAGE_SIZE) -> np.ndarray:
    """A cluttered background ``[h, w, 3]`` float32 in ``[0, 255]``.

    A linear gradient between two dull colours at a random angle, smooth colour noise (a
    coarse random grid resized bicubically), pixel noise, sometimes a stripe texture, and
    2-6 distractor strokes whose colours are drawn from the object colours half the time.

    Args:
        rng: the random generator the scene draws from.
        h, w: the image size.

    Returns:
        ``[h, w, 3]`` float32 in ``[0, 255]``.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    t = (np.cos(a) * (xx - w / 2) + np.sin(a) * (yy - h / 2)) / max(h, w) + 0.5  # [h, w]
    c0, c1 = _muted_colour(rng), _muted_colour(rng)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]  # [h, w, 3]
    g = int(rng.integers(3, 9))
    coarse = rng.normal(0, rng.uniform(8, 22), size=(g, g, 3)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., k], mode="F").resize(
        (w, h), Image.Resampling.BICUBIC)) for k in range(3)], -1)  # [h, w, 3]
    img = img + smooth
    if rng.random() < 0.35:  # stripes
        period = rng.uniform(4, 10)
        b = rng.uniform(0, math.pi)
        s = np.sin((np.cos(b) * xx + np.sin(b) * yy) * 2 * math.pi / period)
        img = img + (s * rng.uniform(6, 16))[..., None]
    img = img + rng.normal(0, rng.uniform(2, 9), size=(h, w, 3))
    img = np.clip(img, 0, 255).astype(np.float32)
    names = list(COLOURS)
    for _ in range(int(rng.integers(2, 7))):
        cov = _stroke_coverage(rng, h, w)
        colour = (COLOURS[names[rng.integers(len(names))]] if rng.random() < 0.5
                  else rng.uniform(30, 230, size=3))
        img = _blend(img, cov, colour)
    return img


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------

def _place(rng, shape, colour, size, center, h, w) -> SceneObject:
    angle = float(rng.uniform(-12, 12))
    return SceneObject(shape, colour, (float(center[0]), float(center[1])), float(size), angle,
                       coverage(shape, size, center, angle, h, w))


def _compose(bg: np.ndarray, objects: Sequence[SceneObject]) -> np.ndarray:
    img = bg
    for o in objects:
        img = _blend(img, o.coverage, COLOURS[o.colour])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def classification_scene(seed: int, size: int = IMAGE_SIZE) -> Scene:
    """One shape on clutter; the class is the shape.

    Args:
        seed: any non-negative int; the scene is a pure function of it.
        size: image side in pixels (shape sizes scale with it).

    Returns:
        :class:`Scene` with one object; ``words`` is ``["a", colour, shape]``.
    """
    rng = np.random.default_rng(seed)
    k = size / IMAGE_SIZE
    bg = background(rng, size, size)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    d = float(rng.uniform(18, 30)) * k
    m = d / 2 + 1
    center = rng.uniform(m, size - m, size=2)
    obj = _place(rng, shape, colour, d, center, size, size)
    img = _compose(bg, [obj])
    return Scene(img, np.clip(np.rint(bg), 0, 255).astype(np.uint8), [obj], SHAPES.index(shape),
                 ["a", colour, shape], [None, 0, 0], int(seed))


def _relation(first: np.ndarray, second: np.ndarray) -> str:
    dx, dy = second - first  # from the first object to the second
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"  # the second is lower: the first is above
    return "left of" if dx > 0 else "right of"


def caption_scene(seed: int, size: int = IMAGE_SIZE) -> Scene:
    """Two shapes on clutter, captioned ``"a <colour> <shape> <relation> a <colour> <shape>"``.

    The larger object is named first (diameters 24-30 px vs 16-20 px at 64 px); the two
    differ in colour and in shape; they do not touch; the dominant axis of their
    displacement is at least 1.6 times the other one.

    Args:
        seed: any non-negative int; the scene is a pure function of it.
        size: image side in pixels (shape sizes scale with it).

    Returns:
        :class:`Scene` with two objects; ``label`` is the shape of the first.

    Raises:
        RuntimeError: the two objects could not be placed (never seen: the sampler accepts
            within a few tries).
    """
    rng = np.random.default_rng(seed)
    k = size / IMAGE_SIZE
    bg = background(rng, size, size)
    shapes = rng.choice(len(SHAPES), size=2, replace=False)
    names = list(COLOURS)
    colours = rng.choice(len(names), size=2, replace=False)
    d = np.array([rng.uniform(24, 30), rng.uniform(16, 20)]) * k
    for _ in range(1000):
        c = np.stack([rng.uniform(d[i] / 2 + 1, size - d[i] / 2 - 1, size=2) for i in range(2)])
        delta = np.abs(c[1] - c[0])
        gap = float(np.hypot(*delta))
        if gap >= (d[0] + d[1]) / 2 + 2 * k and max(delta) >= 1.6 * min(delta):
            break
    else:  # pragma: no cover - the rejection sampler accepts within a few tries
        raise RuntimeError(f"could not place two objects for seed {seed}")
    objs = [_place(rng, SHAPES[int(shapes[i])], names[int(colours[i])], d[i], c[i], size, size)
            for i in range(2)]
    rel = _relation(c[0], c[1])
    words = ["a", objs[0].colour, objs[0].shape, *rel.split(), "a", objs[1].colour, objs[1].shape]
    word_objects: list[int | None] = [None, 0, 0] + [None] * len(rel.split()) + [None, 1, 1]
    img = _compose(bg, objs)
    return Scene(img, np.clip(np.rint(bg), 0, 255).astype(np.uint8), objs, SHAPES.index(objs[0].shape),
                 words, word_objects, int(seed))


def make_dataset(kind: str, seeds: Sequence[int], size: int = IMAGE_SIZE) -> list[Scene]:
    """Scenes for a list of seeds.

    Args:
        kind: ``"classification"`` or ``"caption"``.
        seeds: one scene per seed.
        size: image side in pixels.

    Returns:
        One :class:`Scene` per seed, in order.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "classification":
        fn = classification_scene
    elif kind == "caption":
        fn = caption_scene
    else:
        raise ValueError(f"kind must be 'classification' or 'caption', got {kind!r}")
    return [fn(int(s), size) for s in seeds]


# fixed seed ranges: training, the held-out set the documented numbers come from, and a
# further fresh range the tests draw from
TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 1_000_000 + 1000)
FRESH_SEEDS = range(2_000_000, 3_000_000)

