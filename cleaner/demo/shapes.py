"""Procedural images for the demo dataset "shapes-10": coloured shapes on varied backgrounds.

Each class has a typical colour matching its "is usually ..." feature in ``shapes.yaml``;
about a quarter of the samples get another colour, so that the shape, not the colour, decides
the class. Shapes are drawn as a supersampled mask (4x, downsampled with LANCZOS) and pasted
in one solid colour onto a background (solid, gradient, stripes, speckle or checkerboard)
whose colours keep the shape visible. Everything is driven by the caller's
``numpy.random.Generator``, so a given generator state always gives the same image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "square",
    "rectangle",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "crescent",
)

SUPERSAMPLING = 4
OTHER_COLOUR_PROBABILITY = 0.25
MIN_SPAN, MAX_SPAN = 0.4, 0.8  # largest side of the shape's bounding box, as a fraction of size
MIN_CONTRAST = 120.0  # Euclidean RGB distance between a shape colour and its background colours
COLOUR_JITTER = 12
BACKGROUND_JITTER = 10

SHAPE_COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (215, 35, 35),
        "orange": (245, 140, 20),
        "yellow": (245, 220, 30),
        "green": (40, 170, 60),
        "blue": (35, 80, 220),
        "dark blue": (20, 30, 130),
        "cyan": (40, 210, 225),
        "purple": (130, 50, 180),
        "pink": (245, 120, 190),
        "white": (245, 245, 245),
        "silver": (190, 195, 205),
        "brown": (130, 80, 40),
        "black": (20, 20, 20),
    }
)

TYPICAL_COLOURS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "circle": ("red",),
        "ellipse": ("red", "orange"),
        "square": ("blue",),
        "rectangle": ("blue", "cyan"),
        "triangle": ("green",),
        "star": ("yellow",),
        "cross": ("purple",),
        "ring": ("orange",),
        "diamond": ("pink",),
        "crescent": ("white", "silver"),
    }
)

BACKGROUND_COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "grey": (128, 128, 128),
        "light grey": (200, 200, 200),
        "dark grey": (60, 60, 60),
        "black": (12, 12, 12),
        "white": (250, 250, 250),
        "beige": (225, 210, 175),
        "cream": (250, 245, 220),
        "navy": (25, 30, 75),
        "light blue": (170, 200, 230),
        "lavender": (200, 190, 230),
        "olive": (110, 110, 50),
        "teal": (30, 110, 110),
        "dark green": (30, 70, 40),
        "brown": (100, 70, 45),
    }
)

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "stripes", "speckle", "checkerboard")


def _contrasting_backgrounds(rgb: tuple[int, int, int]) -> tuple[str, ...]:
    """Background colour names far enough (RGB distance) from a shape colour to keep it visible."""
    return tuple(
        name for name, bg in BACKGROUND_COLOURS.items() if math.dist(rgb, bg) >= MIN_CONTRAST
    )


# Immutable lookup tables, computed once from the constants above.
_OTHER_COLOURS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {cls: tuple(c for c in SHAPE_COLOURS if c not in TYPICAL_COLOURS[cls]) for cls in SHAPE_CLASSES}
)
_BACKGROUNDS_FOR: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: _contrasting_backgrounds(rgb) for name, rgb in SHAPE_COLOURS.items()}
)


def _jitter(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple[int, ...]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------


def _pick_two(count: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two distinct indices in [0, count)."""
    first = int(rng.integers(count))
    second = (first + 1 + int(rng.integers(count - 1))) % count
    return first, second


def _to_image(pixels: np.ndarray) -> Image.Image:
    """An RGB image from an [H, W, 3] uint8 array."""
    height, width = pixels.shape[:2]
    return Image.frombytes("RGB", (width, height), np.ascontiguousarray(pixels).tobytes())


def _background(shape_colour: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A background image whose colours contrast with `shape_colour`, plus a short description."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    choices = _BACKGROUNDS_FOR[shape_colour]
    first, second = (choices[i] for i in _pick_two(len(choices), rng))
    base = np.array([BACKGROUND_COLOURS[first], BACKGROUND_COLOURS[second]], dtype=np.int16)
    jitter = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=(2, 3), dtype=np.int16)
    palette = np.clip(base + jitter, 0, 255).astype(np.uint8)  # [2, 3]: first, second colour
    if kind == "solid":
        rgb = tuple(int(v) for v in palette[0])
        return Image.new("RGB", (size, size), rgb), f"plain {first} background"

    xs = np.arange(size, dtype=np.float32)[None, :]
    ys = np.arange(size, dtype=np.float32)[:, None]
    if kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        low = (size - 1) * (min(cos, 0.0) + min(sin, 0.0))  # projection range over the corners
        scale = 255.0 / max((size - 1) * (abs(cos) + abs(sin)), 1e-6)
        proj = xs * np.float32(cos * scale) + ys * np.float32(sin * scale) - np.float32(low * scale)
        ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
        start = palette[0].astype(np.float32)
        lookup = (start + ramp * (palette[1].astype(np.float32) - start)).astype(np.uint8)
        steps = np.clip(proj, 0, 255).astype(np.uint8)
        image = _to_image(np.take(lookup, steps, axis=0))
        return image, f"{first} and {second} gradient background"
    if kind == "speckle":
        amplitude = int(rng.integers(10, 30))
        noise_bytes = np.frombuffer(rng.bytes(2 * size * size), dtype=np.uint8)
        grain = (noise_bytes[: size * size] % (2 * amplitude + 1)).reshape(size, size)
        offsets = np.arange(256, dtype=np.int16)[:, None] - amplitude
        lookup = np.clip(palette[0].astype(np.int16) + offsets, 0, 255).astype(np.uint8)
        image = _to_image(np.take(lookup, grain, axis=0))  # first colour plus grey grain
        specks = noise_bytes[size * size :] < int(256 * rng.uniform(0.03, 0.12))
        speck_mask = Image.frombytes("L", (size, size), (specks.view(np.uint8) * 255).tobytes())
        image.paste(tuple(int(v) for v in palette[1]), (0, 0), speck_mask)
        return image, f"speckled {first} background"
    if kind == "stripes":
        angle = math.radians(float(rng.choice([0.0, 45.0, 90.0, 135.0])) + rng.uniform(-10, 10))
        period = np.float32(rng.uniform(0.06, 0.2) * size)
        phase = np.float32(rng.uniform(0.0, float(period)))
        proj = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle)) + phase
        in_band = (proj - np.floor(proj / period) * period) < period / 2
        pattern = in_band
        description = f"striped {first} and {second} background"
    else:  # checkerboard
        cell = max(2, round(rng.uniform(0.06, 0.25) * size))
        off_x, off_y = (int(v) for v in rng.integers(0, cell, size=2))
        columns = ((np.arange(size) + off_x) // cell)[None, :]
        rows = ((np.arange(size) + off_y) // cell)[:, None]
        pattern = ((columns + rows) & 1) == 0
        description = f"checkered {first} and {second} background"
    # pattern True -> second colour, False -> first colour
    return _to_image(np.take(palette, pattern.view(np.uint8), axis=0)), description


# ---------------------------------------------------------------------------------------------
# Shape geometry (unit coordinates centred on the origin, y pointing down)
# ---------------------------------------------------------------------------------------------

# A shape is a list of drawing operations on the mask: ("polygon", points, fill) or
# ("ellipse", (cx, cy, rx, ry), fill), applied in order (fill 0 cuts holes).
_Op = tuple[str, object, int]


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _ellipse_polygon(rx: float, ry: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _long_axis_angle(rng: np.random.Generator, jitter: float) -> float:
    """Horizontal or vertical, plus a little jitter (elongated shapes)."""
    return float(rng.choice([0.0, 90.0])) + rng.uniform(-jitter, jitter)


def _shape_ops(class_name: str, rng: np.random.Generator) -> list[_Op]:
    """Drawing operations for one random instance of `class_name`, in unit coordinates."""
    if class_name == "circle":
        return [("ellipse", (0.0, 0.0, 1.0, 1.0), 255)]
    if class_name == "ellipse":
        ratio = rng.uniform(1.6, 2.5)
        points = _rotate(_ellipse_polygon(ratio, 1.0), _long_axis_angle(rng, 20.0))
        return [("polygon", points, 255)]
    if class_name == "square":
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        return [("polygon", _rotate(points, rng.uniform(-15, 15)), 255)]
    if class_name == "rectangle":
        ratio = rng.uniform(1.6, 2.5)
        points = np.array([[-ratio, -1], [ratio, -1], [ratio, 1], [-ratio, 1]], dtype=np.float64)
        return [("polygon", _rotate(points, _long_axis_angle(rng, 15.0)), 255)]
    if class_name == "triangle":
        half_base = rng.uniform(0.8, 1.15)
        points = np.array([[0.0, -1.0], [half_base, 0.75], [-half_base, 0.75]])
        return [("polygon", _rotate(points, rng.uniform(-15, 15)), 255)]
    if class_name == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        return [("polygon", _rotate(points, rng.uniform(-20, 20)), 255)]
    if class_name == "cross":
        t = rng.uniform(0.2, 0.33)  # half width of an arm; arms reach 1
        points = np.array(
            [
                [-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
                [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t],
            ],
            dtype=np.float64,
        )  # fmt: skip
        return [("polygon", _rotate(points, rng.uniform(-15, 15)), 255)]
    if class_name == "ring":
        hole = rng.uniform(0.45, 0.65)
        return [("ellipse", (0.0, 0.0, 1.0, 1.0), 255), ("ellipse", (0.0, 0.0, hole, hole), 0)]
    if class_name == "diamond":
        stretch = rng.uniform(1.0, 1.35)  # taller than wide: pointed at the top and bottom
        points = np.array([[0.0, -stretch], [1.0, 0.0], [0.0, stretch], [-1.0, 0.0]])
        return [("polygon", _rotate(points, rng.uniform(-10, 10)), 255)]
    if class_name == "crescent":
        bite_radius = rng.uniform(0.75, 0.95)  # offset + bite > 1: two sharp tips
        offset = rng.uniform(0.4, 0.65)  # thickest part: 1 + offset - bite >= 0.45
        direction = rng.uniform(0.0, 2.0 * math.pi)
        bite = (offset * math.cos(direction), offset * math.sin(direction))
        return [
            ("ellipse", (0.0, 0.0, 1.0, 1.0), 255),
            ("ellipse", (bite[0], bite[1], bite_radius, bite_radius), 0),
        ]
    raise ValueError(f"unknown shape class {class_name!r}; expected one of {SHAPE_CLASSES}")


def _bounds(ops: Sequence[_Op]) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the filled operations (holes never enlarge a shape)."""
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for kind, geometry, fill in ops:
        if fill == 0:
            continue
        if kind == "polygon":
            points = np.asarray(geometry)
            lo, hi = points.min(axis=0), points.max(axis=0)
            box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
        else:
            cx, cy, rx, ry = geometry  # type: ignore[misc]
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
        x0, y0 = min(x0, box[0]), min(y0, box[1])
        x1, y1 = max(x1, box[2]), max(y1, box[3])
    return x0, y0, x1, y1


def _draw_mask(
    ops: Sequence[_Op], scale: float, centre: tuple[float, float], region: tuple[int, int, int, int]
) -> Image.Image:
    """Render the operations, placed at `centre` and `scale` (pixels), into a mask of `region`.

    The mask is drawn at SUPERSAMPLING times the resolution and downsampled with LANCZOS.
    """
    rx0, ry0, rx1, ry1 = region
    k = SUPERSAMPLING
    canvas = Image.new("L", ((rx1 - rx0) * k, (ry1 - ry0) * k), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = (centre[0] - rx0) * k, (centre[1] - ry0) * k
    for kind, geometry, fill in ops:
        if kind == "polygon":
            points = np.asarray(geometry) * (scale * k) + (ox, oy)
            draw.polygon([(float(x), float(y)) for x, y in points], fill=fill)
        else:
            cx, cy, rx, ry = geometry  # type: ignore[misc]
            px, py = ox + cx * scale * k, oy + cy * scale * k
            sx, sy = rx * scale * k, ry * scale * k
            draw.ellipse((px - sx, py - sy, px + sx, py + sy), fill=fill)
    return canvas.resize((rx1 - rx0, ry1 - ry0), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def draw_shape(
    class_name: str, rng: np.random.Generator, size: int = 64
) -> tuple[Image.Image, dict[str, str]]:
    """Draw one random `class_name` shape as an RGB `size` x `size` image.

    Returns the image and caption attributes ``{"colour": ..., "background": ...}``, e.g.
    ``{"colour": "red", "background": "striped grey and navy background"}``. The result is a
    deterministic function of the generator's state. ValueError for an unknown class name.
    """
    if class_name not in TYPICAL_COLOURS:
        raise ValueError(f"unknown shape class {class_name!r}; expected one of {SHAPE_CLASSES}")
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")

    if rng.random() < OTHER_COLOUR_PROBABILITY:
        palette = _OTHER_COLOURS[class_name]
    else:
        palette = TYPICAL_COLOURS[class_name]
    colour = palette[int(rng.integers(len(palette)))]
    rgb = _jitter(SHAPE_COLOURS[colour], COLOUR_JITTER, rng)

    image, background = _background(colour, rng, size)

    ops = _shape_ops(class_name, rng)
    ux0, uy0, ux1, uy1 = _bounds(ops)
    span = rng.uniform(MIN_SPAN, MAX_SPAN) * size
    scale = span / max(ux1 - ux0, uy1 - uy0)
    width, height = (ux1 - ux0) * scale, (uy1 - uy0) * scale
    left = rng.uniform(1.0, max(1.0, size - 1.0 - width))
    top = rng.uniform(1.0, max(1.0, size - 1.0 - height))
    centre = (left - ux0 * scale, top - uy0 * scale)

    pad = 2  # room for the LANCZOS kernel around the shape
    region = (
        max(0, math.floor(left) - pad),
        max(0, math.floor(top) - pad),
        min(size, math.ceil(left + width) + pad),
        min(size, math.ceil(top + height) + pad),
    )
    mask = _draw_mask(ops, scale, centre, region)
    image.paste(rgb, region[:2], mask)
    return image, {"colour": colour, "background": background}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sample `index` of a batch drawn with `seed` (independent per sample)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def generate_images(
    labels: np.ndarray | Sequence[int], seed: int, size: int = 64, *, start_index: int = 0
) -> tuple[list[Image.Image], list[dict[str, str]]]:
    """Draw one image per label (indices into SHAPE_CLASSES); returns (images, attributes).

    Sample i uses ``sample_rng(seed, start_index + i)``, so the result depends only on the seed
    and each sample's position: generating a batch in chunks (passing `start_index`) gives the
    same images as generating it at once.
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {label_array.shape}")
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {label_array.dtype}")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(SHAPE_CLASSES)):
        raise ValueError(
            f"labels must lie in [0, {len(SHAPE_CLASSES)}), got range "
            f"[{label_array.min()}, {label_array.max()}]"
        )
    images: list[Image.Image] = []
    attributes: list[dict[str, str]] = []
    for offset, label in enumerate(label_array.tolist()):
        image, attrs = draw_shape(
            SHAPE_CLASSES[label], sample_rng(seed, start_index + offset), size
        )
        images.append(image)
        attributes.append(attrs)
    return images, attributes
