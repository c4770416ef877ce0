"""The generated sample collection: procedural "movements", one folder per label.

Each movement differs from the others in local texture (dots, dabs, facets, stripes, washes) and in global
composition (stacked blocks, a central cluster, sparse strokes on empty paper, all-over patterns). Palettes
come from one shared generator and pairs of movements share a layout (pointillism/impressionist) or a
palette role (colour_field/cubist), so neither colour statistics nor one texture cue solves the task
alone: a CNN+Transformer fusion has something to win over either branch.
"""

from __future__ import annotations

import colorsys
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artfuse.config import ConfigError
from artfuse.data.storage import resolve

Rng = np.random.Generator
Color = tuple[int, int, int]

JPEG_QUALITY = 90
PNG_EVERY = 10  # every 10th image of a class is a PNG, the rest JPEG


def _palette(rng: Rng, k: int = 5) -> list[Color]:
    """k colours around one random hue: analogous, complementary or triadic, with varied saturation."""
    base = rng.random()
    spread = rng.choice([0.08, 0.5, 1 / 3])
    colors = []
    for i in range(k):
        hue = (base + spread * (i % 3) + rng.normal(0, 0.03)) % 1.0
        sat = rng.uniform(0.3, 0.9)
        val = rng.uniform(0.35, 0.95)
        colors.append(tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)))
    return colors


def _jitter(rng: Rng, color: Color, amount: int) -> Color:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _bands(rng: Rng, h: int, palette: list[Color]) -> tuple[np.ndarray, np.ndarray]:
    """A landscape layout shared by the dot and dab movements: 2-3 horizontal bands (sky, land, water).

    Returns the bands' lower edges and their colours, (k,) and (k, 3).
    """
    k = int(rng.integers(2, 4))
    ends = np.append(np.sort(rng.uniform(0.25, 0.75, k - 1)) * h, h + 1)
    return ends, np.array(palette)[rng.integers(len(palette), size=k)]


def _dab_colors(
    rng: Rng,
    ys: np.ndarray,
    bands: tuple[np.ndarray, np.ndarray],
    palette: list[Color],
    accent: float,
    jitter: int,
) -> list[tuple[int, ...]]:
    """Per-mark colours: the band's colour under each mark, or an accent from the palette, jittered."""
    ends, colors = bands
    base = colors[np.searchsorted(ends, ys, side="right").clip(0, len(ends) - 1)]
    accents = rng.random(ys.size) < accent
    base[accents] = np.array(palette)[rng.integers(len(palette), size=int(accents.sum()))]
    jittered = np.clip(base + rng.integers(-jitter, jitter + 1, base.shape), 0, 255)
    return [tuple(c) for c in jittered.tolist()]


def _grain(rng: Rng, img: Image.Image, amount: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, amount, (img.height, img.width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def pointillism(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    bands = _bands(rng, h, palette)
    img = Image.new("RGB", (w, h), _jitter(rng, (235, 230, 215), 15))
    draw = ImageDraw.Draw(img)
    n = int(w * h / rng.uniform(9, 14))
    xs, ys, radii = rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(1.0, 2.6, n)
    colors = _dab_colors(rng, ys, bands, palette, accent=0.3, jitter=35)
    for x, y, r, color in zip(xs.tolist(), ys.tolist(), radii.tolist(), colors, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return img


def impressionist(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    ends, band_colors = bands = _bands(rng, h, palette)
    img = Image.new("RGB", (w, h))
    top = 0
    for end, color in zip(ends.tolist(), band_colors.tolist(), strict=True):  # underpainting: no white gaps
        ImageDraw.Draw(img).rectangle((0, top, w, end), fill=tuple(color))
        top = end
    img = img.filter(ImageFilter.GaussianBlur(8))
    draw = ImageDraw.Draw(img)
    n = int(w * h / rng.uniform(45, 70))
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    lengths, widths = rng.uniform(6, 16, n), rng.integers(3, 7, n)
    angles = rng.uniform(-0.6, 0.6) + rng.normal(0, 0.35, n)  # a dominant direction, as a painter's hand
    dxs, dys = np.cos(angles) * lengths / 2, np.sin(angles) * lengths / 2
    colors = _dab_colors(rng, ys, bands, palette, accent=0.35, jitter=30)
    for x, y, dx, dy, width, color in zip(
        xs.tolist(), ys.tolist(), dxs.tolist(), dys.tolist(), widths.tolist(), colors, strict=True
    ):
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=color, width=width)
    return img


def colour_field(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    ground, *block_colors = (palette[int(i)] for i in rng.permutation(len(palette)))
    img = Image.new("RGB", (w, h), ground)
    layer = img.copy()
    draw = ImageDraw.Draw(layer)
    n = int(rng.integers(2, 4))
    margin_x, margin_y = w * rng.uniform(0.06, 0.14), h * rng.uniform(0.04, 0.1)
    gap = h * rng.uniform(0.03, 0.08)
    heights = rng.dirichlet(np.full(n, 3.0)) * (h - 2 * margin_y - (n - 1) * gap)
    y = margin_y
    for block_h, color in zip(heights, block_colors, strict=False):
        draw.rectangle((margin_x, y, w - margin_x, y + block_h), fill=_jitter(rng, color, 25))
        y += block_h + gap
    img = layer.filter(ImageFilter.GaussianBlur(rng.uniform(3, 8)))  # Rothko's feathered edges
    return _grain(rng, img, 3.0)


def cubist(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    muted = tuple(int(c * 0.5 + 100) for c in palette[int(rng.integers(len(palette)))])
    img = Image.new("RGB", (w, h), muted)
    draw = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    spread = min(w, h) * rng.uniform(0.25, 0.4)
    outline = _jitter(rng, (40, 35, 30), 20)
    for _ in range(int(rng.integers(18, 40))):
        px, py = cx + rng.normal(0, spread * 0.6), cy + rng.normal(0, spread * 0.6)
        k = int(rng.integers(3, 6))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radius = rng.uniform(0.2, 0.6) * spread
        points = [(px + math.cos(a) * radius, py + math.sin(a) * radius) for a in angles]
        color = _jitter(rng, palette[int(rng.integers(len(palette)))], 40)
        draw.polygon(points, fill=color, outline=outline, width=int(rng.integers(1, 4)))
    return _grain(rng, img, 2.0)


def ink_wash(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    paper = _jitter(rng, (238, 232, 214), 10)
    ink = np.array(rng.choice([(30, 30, 32), (60, 45, 30), (35, 40, 60)]))  # black, sepia or indigo ink
    img = Image.new("RGB", (w, h), paper)
    wash = Image.new("L", (w, h), 0)
    wash_draw = ImageDraw.Draw(wash)
    for _ in range(int(rng.integers(1, 3))):  # distant mountains: a soft grey silhouette from one side
        base = h * rng.uniform(0.55, 0.9)
        xs = np.linspace(0, w, 9)
        peaks = base - rng.uniform(0.1, 0.45, xs.size) * h
        wash_draw.polygon([(0, h), *zip(xs, peaks, strict=True), (w, h)], fill=int(rng.integers(40, 110)))
    wash = wash.filter(ImageFilter.GaussianBlur(rng.uniform(4, 10)))
    strokes = Image.new("L", (w, h), 0)
    stroke_draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(3, 9))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        a, width = rng.uniform(0, 2 * math.pi), rng.uniform(3, 9)
        darkness = int(rng.integers(140, 256))
        for _ in range(int(rng.integers(6, 18))):
            a += rng.normal(0, 0.3)
            nx, ny = x + math.cos(a) * 8, y + math.sin(a) * 8
            stroke_draw.line((x, y, nx, ny), fill=darkness, width=max(1, int(width)))
            x, y, width = nx, ny, width * 0.92
    alpha = np.maximum(np.asarray(wash), np.asarray(strokes.filter(ImageFilter.GaussianBlur(0.8))))[..., None]
    out = np.asarray(img, dtype=np.float32) * (1 - alpha / 255) + ink * (alpha / 255)
    img = Image.fromarray(out.astype(np.uint8))
    if rng.random() < 0.5:  # a red seal, sharing a saturated colour with the other movements
        s = int(min(w, h) * 0.07)
        x0, y0 = int(rng.uniform(0.05, 0.85) * w), int(rng.uniform(0.7, 0.9) * h)
        ImageDraw.Draw(img).rectangle((x0, y0, x0 + s, y0 + s), fill=_jitter(rng, (180, 40, 35), 20))
    return _grain(rng, img, 2.0)


def op_art(rng: Rng, w: int, h: int, palette: list[Color]) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(7, 16)
    if rng.random() < 0.5:  # concentric rings around an off-centre point
        cx, cy = w * rng.uniform(0.2, 0.8), h * rng.uniform(0.2, 0.8)
        phase = np.hypot(xx - cx, yy - cy)
    else:  # stripes, bent by a slow wave (Bridget Riley)
        a = rng.uniform(0, math.pi)
        phase = xx * math.cos(a) + yy * math.sin(a)
        phase += rng.uniform(5, 20) * np.sin(yy * math.cos(a) / rng.uniform(20, 60) - xx * math.sin(a) / 40)
    mask = np.sin(2 * math.pi * phase / period) > 0
    if rng.random() < 0.5:
        dark, light = (20, 20, 20), (235, 235, 230)
    else:
        by_luma = sorted(palette, key=lambda c: 0.3 * c[0] + 0.6 * c[1] + 0.1 * c[2])
        # the palette's extremes, pushed apart: the stripes must vibrate, not fade into one colour
        dark = tuple(int(c * 0.45) for c in by_luma[0])
        light = tuple(int(c * 0.4 + 150) for c in by_luma[-1])
    out = np.where(mask[..., None], np.array(light, np.uint8), np.array(dark, np.uint8))
    return _grain(rng, Image.fromarray(out.astype(np.uint8)), 3.0)


GENERATORS: dict[str, Callable[[Rng, int, int, list[Color]], Image.Image]] = {
    "pointillism": pointillism,
    "impressionist": impressionist,
    "colour_field": colour_field,
    "cubist": cubist,
    "ink_wash": ink_wash,
    "op_art": op_art,
}
MOVEMENTS: tuple[str, ...] = tuple(GENERATORS)


def render(movement: str, index: int, seed: int = 0, size_range: tuple[int, int] = (160, 320)) -> Image.Image:
    """One image, determined only by (seed, movement, index): the same bytes whatever else is generated."""
    rng = np.random.default_rng([seed, MOVEMENTS.index(movement), index])
    lo, hi = size_range
    w = int(rng.integers(lo, hi + 1))
    h = int(rng.integers(lo, hi + 1))
    if h == w:  # never square, so loaders cannot assume it
        h = h - 1 if h > lo else h + 1
    return GENERATORS[movement](rng, w, h, _palette(rng))


def generate_samples(out: str, n: int = 240, seed: int = 0, *, size_range: tuple[int, int] = (160, 320)) -> dict:
    """Write n // len(MOVEMENTS) images per movement to `out`/<movement>/<name>.jpg|.png.

    `out` is a local path or a URI (s3://, file://); remote collections are written locally, then uploaded.
    """
    per_class = n // len(MOVEMENTS)
    if per_class < 1:
        raise ConfigError(f"--n must be at least {len(MOVEMENTS)} (one image per movement); got {n}")
    lo, hi = size_range
    if not 16 <= lo < hi:
        raise ConfigError(f"size_range must be (low, high) with 16 <= low < high; got {size_range}")
    fs, root = resolve(out)
    if _is_local(fs):
        _write(Path(root), per_class, seed, size_range)
    else:
        with tempfile.TemporaryDirectory(prefix="artfuse-samples-") as tmp:
            files = _write(Path(tmp), per_class, seed, size_range)
            fs.put(
                [str(f) for f in files],
                [f"{root.rstrip('/')}/{f.relative_to(tmp).as_posix()}" for f in files],
            )
    return {"out": out, "n": per_class * len(MOVEMENTS), "classes": list(MOVEMENTS)}


def _write(root: Path, per_class: int, seed: int, size_range: tuple[int, int]) -> list[Path]:
    files = []
    for movement in MOVEMENTS:
        folder = root / movement
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = render(movement, i, seed, size_range)
            if i % PNG_EVERY == PNG_EVERY - 1:
                path = folder / f"{movement}_{i:04d}.png"
                img.save(path, format="PNG")
            else:
                path = folder / f"{movement}_{i:04d}.jpg"
                img.save(path, format="JPEG", quality=JPEG_QUALITY)
            files.append(path)
    return files


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
