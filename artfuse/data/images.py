"""bytes -> RGB uint8 array: the one place artfuse decodes an image.

Archives hold files whose extension lies, CMYK scans, 16-bit TIFFs, palette GIFs, EXIF-rotated photos,
truncated uploads, zero-byte objects, huge scans and decompression bombs. `decode_image` goes by content
(Pillow's own format checks), decodes large JPEGs at a reduced DCT scale (draft mode), applies the pixel
limit to what would really be decoded, and turns every failure into a short machine-readable reason
(one of `ERROR_REASONS`) plus a message. It never raises on bad data.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp")

EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # content is no image format we know
UNSUPPORTED = "unsupported"  # an image, in a format or mode not decodable here (HEIC, JPEG XL, ...)
TRUNCATED = "truncated"  # the data ends before the image does
CORRUPT = "corrupt"  # the data is damaged
TOO_MANY_PIXELS = "too_many_pixels"  # decoding would exceed max_pixels (a bomb, or a scan too large)
DECOMPRESSION_BOMB = "decompression_bomb"  # a compressed non-pixel part expands past Pillow's limit
ERROR_REASONS = (EMPTY, NOT_AN_IMAGE, UNSUPPORTED, TRUNCATED, CORRUPT, TOO_MANY_PIXELS, DECOMPRESSION_BOMB)

_DRAFTABLE = ("JPEG", "MPO")
_FORMAT_NAMES = {"MPO": "JPEG"}  # camera multi-picture files are JPEGs whose first image is what we read
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"mif1", b"msf1", b"avif", b"avis")
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass
class Decoded:
    array: np.ndarray | None  # (size, size, 3) uint8 RGB; None when the image could not be decoded
    width: int  # original size as displayed (after EXIF orientation); 0 when unknown
    height: int
    format: str  # "JPEG", "PNG", "WEBP", "GIF", "TIFF", ... from the content; "" when unknown
    error: str | None = None  # one of ERROR_REASONS
    message: str | None = None  # what went wrong, for people

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_image(data: bytes, size: int, *, max_pixels: int = 64_000_000, draft: bool = True) -> Decoded:
    """Decode `data` to a (size, size, 3) RGB array: shorter side resized to `size`, then center-cropped.

    Args:
        data: the encoded bytes; the format is sniffed from them, never from a file name.
        size: output side in pixels.
        max_pixels: largest image that may be decoded, counted after JPEG draft scaling, so a 20,000-pixel
            JPEG scan decodes at 1/8 scale while a PNG or GIF declaring the same size is refused.
        draft: decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= `size`.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if not data:
        return Decoded(None, 0, 0, "", EMPTY, "the object has zero bytes")
    try:
        im = _open(data)
    except Exception as e:  # every failure becomes a reason
        return _failed(e, data, "", 0, 0)
    fmt = _FORMAT_NAMES.get(im.format or "", im.format or "")
    width, height = im.size
    try:
        with im:
            if draft and im.format in _DRAFTABLE:
                im.draft("RGB", (size, size))
            if im.width * im.height > max_pixels:
                message = f"{im.width} x {im.height} pixels to decode exceed max_pixels={max_pixels:,}"
                return Decoded(None, width, height, fmt, TOO_MANY_PIXELS, message)
            im.load()
            if _transpose_by_exif(im):
                width, height = height, width
            array = np.asarray(_to_rgb_square(im, size))
    except Exception as e:
        return _failed(e, data, fmt, width, height)
    return Decoded(array, width, height, fmt)


def preview_jpeg(data: bytes, max_side: int, *, max_pixels: int = 64_000_000, quality: int = 85) -> bytes | None:
    """The whole image (not cropped), upright, fitted within max_side x max_side, as a JPEG for a browser; None
    when `decode_image` would give an error for it."""
    try:
        im = _open(data)
        with im:
            if im.format in _DRAFTABLE:
                im.draft("RGB", (max_side, max_side))
            if im.width * im.height > max_pixels:
                return None
            im.load()
            _transpose_by_exif(im)
            im = _resizable(im)
            im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if im.mode in ("RGBA", "LA"):
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            buffer = io.BytesIO()
            im.convert("RGB").save(buffer, "JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - bad data has no preview; decode_image names the reason in the predictions
        return None
    return buffer.getvalue()


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window of an (..., H, W, C) array, as a view."""
    height, width = array.shape[-3:-1]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size} x {size} from {height} x {width}")
    top, left = (height - size) // 2, (width - size) // 2
    return array[..., top : top + size, left : left + size, :]


def bench_decode(images: Sequence[bytes], size: int, *, draft: bool = True) -> float:
    """Images per second that `decode_image` reaches on `images` in this process (one core)."""
    start = time.perf_counter()
    for data in images:
        decode_image(data, size, draft=draft)
    return len(images) / (time.perf_counter() - start)


def _open(data: bytes) -> Image.Image:
    # Pillow's own bomb check runs on the declared size, before draft scaling can shrink it, and only warns
    # below twice its global limit; decode_image checks what will really be decoded instead.
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data), formats=_sniffable_formats())
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@functools.cache
def _sniffable_formats() -> tuple[str, ...]:
    """Pillow's formats that recognise their own content; TGA and a few others accept almost any bytes."""
    Image.preinit()  # common formats first, as Image.open orders them
    Image.init()
    return tuple(fmt for fmt in Image.ID if Image.OPEN[fmt][1] is not None)


def _transpose_by_exif(im: Image.Image) -> bool:
    """Rotate/flip the loaded `im` in place as its EXIF orientation says; True when the axes swapped."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # a damaged EXIF block should not cost the pixels
        return False
    return orientation in (5, 6, 7, 8)


def _to_rgb_square(im: Image.Image, size: int) -> Image.Image:
    im = _resizable(im)
    side = min(im.size)
    left, top = (im.width - side) / 2, (im.height - side) / 2
    box = (left, top, left + side, top + side)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    if im.mode in ("RGBA", "LA"):  # resized with premultiplied alpha, now composited on white
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")


def _resizable(im: Image.Image) -> Image.Image:
    """`im` in L, LA, RGB or RGBA: the modes that resize correctly (alpha premultiplied)."""
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        return im.convert("RGBA")
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if im.mode in ("PA", "La", "RGBa"):
        return im.convert("RGBA")
    if im.mode.startswith(("I", "F")):
        return _high_depth_to_l(im)
    if im.mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    # Pillow clips 16-bit and 32-bit values to 255 when converting to L, which turns scans white: rescale.
    values = np.asarray(im, dtype=np.float32)
    peak = float(values.max()) if values.size else 0.0
    if im.mode.startswith("I;16") or peak > 255.0:
        values = values * (255.0 / 65535.0)
    elif im.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")


def _failed(error: Exception, data: bytes, fmt: str, width: int, height: int) -> Decoded:
    claimed = _formats_claiming(data)
    fmt = fmt or (_FORMAT_NAMES.get(claimed[0], claimed[0]) if claimed else "")
    reason, message = _reason(error, data, fmt, claimed)
    return Decoded(None, width, height, fmt, reason, message)


def _reason(error: Exception, data: bytes, fmt: str, claimed: tuple[str, ...]) -> tuple[str, str]:
    text = str(error) or type(error).__name__
    if isinstance(error, UnidentifiedImageError):
        if not claimed:
            kind = _unreadable_kind(data)
            if kind:
                return UNSUPPORTED, f"{kind} images cannot be decoded (no Pillow plugin)"
            return NOT_AN_IMAGE, "the content is not a recognised image format"
        text = f"{fmt} header cannot be parsed"
    if isinstance(error, (Image.DecompressionBombError, MemoryError)):
        return TOO_MANY_PIXELS, text
    lowered = text.lower()
    if "decompressed data too large" in lowered:
        return DECOMPRESSION_BOMB, text
    if "truncated" in lowered:
        return TRUNCATED, text
    if any(s in lowered for s in ("not available", "not supported", "unsupported", "ghostscript")):
        return UNSUPPORTED, text
    if _looks_truncated(fmt, data):
        return TRUNCATED, f"{text} (the data ends before the {fmt} image does)"
    return CORRUPT, text


def _formats_claiming(data: bytes) -> tuple[str, ...]:
    prefix = data[:16]
    claimed = []
    for fmt in _sniffable_formats():
        try:
            accepted = Image.OPEN[fmt][1](prefix)
        except Exception:
            continue
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "close, but no" message
            claimed.append(fmt)
    return tuple(claimed)


def _unreadable_kind(data: bytes) -> str | None:
    """Name image formats Pillow does not read, so they are reported as unsupported, not as non-images."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF/AVIF (" + data[8:12].decode("ascii") + ")"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    head = data[:1024].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (trailing zero padding aside): a cut upload does not."""
    return b"\xff\xd9" in data[-1024:].rstrip(b"\0")


def _looks_truncated(fmt: str, data: bytes) -> bool:
    """Whether `data` ends before its format says it should: tells a cut upload from damaged content."""
    if fmt == "JPEG":
        return not jpeg_complete(data)
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    if fmt == "GIF":
        return not data.rstrip(b"\0").endswith(b";")  # the GIF trailer
    if fmt == "WEBP":
        return len(data) < 12 or struct.unpack_from("<I", data, 4)[0] + 8 > len(data)  # RIFF size
    if fmt == "BMP":
        return len(data) < 6 or struct.unpack_from("<I", data, 2)[0] > len(data)  # bfSize
    if fmt == "TIFF":
        if len(data) < 8:
            return True
        order = "<" if data[:2] == b"II" else ">"
        if struct.unpack_from(order + "H", data, 2)[0] == 43:  # BigTIFF: 8-byte offset at 8
            return len(data) < 16 or struct.unpack_from(order + "Q", data, 8)[0] >= len(data)
        return struct.unpack_from(order + "I", data, 4)[0] >= len(data)  # first IFD beyond the end
    return False
