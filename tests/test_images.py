"""decode_image over a generated corpus of the mess archives hold: each good file decodes to the right shape,
each bad one gives its specific reason."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from artfuse.data.images import (
    ERROR_REASONS,
    center_crop,
    decode_image,
)

SIZE = 32
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photograph, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def halves(width: int, height: int, left: tuple, right: tuple) -> Image.Image:
    im = Image.new("RGB", (width, height), left)
    im.paste(right, (width // 2, 0, width, height))
    return im


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes, *extra: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB, lying headers, metadata bombs."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + b"".join(extra)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_rgb16(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    row = b"\0" + struct.pack(">HHH", *rgb) * width  # filter byte, then big-endian samples
    return raw_png(width, height, 16, 2, row * height)


def rgba_with_transparent_corner() -> Image.Image:
    im = Image.new("RGBA", (40, 40), (*BLUE, 255))
    im.paste((0, 0, 0, 0), (0, 0, 20, 20))  # transparent black must come out white
    return im


def exif_rotated_jpeg() -> bytes:
    # stored 60 x 40 with red left, blue right; orientation 6 displays it rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves(60, 40, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 24), colour) for colour in (RED, BLUE, GREEN)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (24, 24), colour) for colour in (GREEN, RED)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def gray16(fmt: str) -> bytes:
    return encode(Image.fromarray(np.full((20, 30), 32768, np.uint16)), fmt)


def jpeg_with_trailer() -> bytes:
    return encode(photo(), "JPEG") + b"camera maker's trailer" * 10


def jpeg_with_broken_exif() -> bytes:
    return encode(photo(), "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff")


# name -> (bytes, format, (width, height) as displayed, expected colour at the centre or None)
GOOD: dict[str, tuple[Callable[[], bytes], str, tuple[int, int], tuple | None]] = {
    "jpeg_landscape": (lambda: encode(photo(120, 80), "JPEG", quality=90), "JPEG", (120, 80), None),
    "jpeg_portrait": (lambda: encode(photo(50, 90), "JPEG"), "JPEG", (50, 90), None),
    "jpeg_progressive": (lambda: encode(photo(), "JPEG", progressive=True), "JPEG", (120, 80), None),
    "jpeg_grayscale": (
        lambda: encode(Image.new("L", (40, 30), 200), "JPEG"),
        "JPEG",
        (40, 30),
        (200, 200, 200),
    ),
    "jpeg_cmyk": (
        lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "JPEG",
        (40, 30),
        RED,
    ),
    "jpeg_trailing_bytes": (jpeg_with_trailer, "JPEG", (120, 80), None),
    "jpeg_broken_exif": (jpeg_with_broken_exif, "JPEG", (120, 80), None),
    "jpeg_one_pixel": (lambda: encode(Image.new("RGB", (1, 1), BLUE), "JPEG"), "JPEG", (1, 1), BLUE),
    "png_rgb": (lambda: encode(photo(), "PNG"), "PNG", (120, 80), None),
    "png_rgba": (lambda: encode(Image.new("RGBA", (30, 30), (*GREEN, 255)), "PNG"), "PNG", (30, 30), GREEN),
    "png_la": (lambda: encode(Image.new("LA", (30, 30), (90, 255)), "PNG"), "PNG", (30, 30), (90, 90, 90)),
    "png_palette": (lambda: encode(photo().convert("P"), "PNG"), "PNG", (120, 80), None),
    "png_bilevel": (lambda: encode(Image.new("1", (30, 30), 1), "PNG"), "PNG", (30, 30), (255, 255, 255)),
    "png_gray16": (lambda: gray16("PNG"), "PNG", (30, 20), (128, 128, 128)),
    "png_rgb16": (lambda: png_rgb16(30, 20, (65535, 32768, 0)), "PNG", (30, 20), (255, 128, 0)),
    "png_apng": (lambda: animated("PNG"), "PNG", (24, 24), RED),
    "gif_animated": (lambda: animated("GIF"), "GIF", (24, 24), RED),
    "gif_palette": (lambda: encode(photo().convert("P"), "GIF"), "GIF", (120, 80), None),
    "webp": (lambda: encode(photo(), "WEBP", quality=90), "WEBP", (120, 80), None),
    "webp_lossless_rgba": (
        lambda: encode(Image.new("RGBA", (30, 30), (*BLUE, 255)), "WEBP", lossless=True),
        "WEBP",
        (30, 30),
        BLUE,
    ),
    "webp_animated": (lambda: animated("WEBP"), "WEBP", (24, 24), RED),
    "tiff_rgb_deflate": (
        lambda: encode(photo(), "TIFF", compression="tiff_deflate"),
        "TIFF",
        (120, 80),
        None,
    ),
    "tiff_gray16": (lambda: gray16("TIFF"), "TIFF", (30, 20), (128, 128, 128)),
    "tiff_cmyk": (
        lambda: encode(Image.new("CMYK", (30, 30), (255, 255, 0, 0)), "TIFF"),
        "TIFF",
        (30, 30),
        BLUE,
    ),
    "tiff_float": (
        lambda: encode(Image.fromarray(np.full((20, 20), 0.5, np.float32), "F"), "TIFF"),
        "TIFF",
        (20, 20),
        (128, 128, 128),
    ),
    "tiff_multipage": (multipage_tiff, "TIFF", (24, 24), GREEN),
    "bmp": (lambda: encode(Image.new("RGB", (30, 20), GREEN), "BMP"), "BMP", (30, 20), GREEN),
}


def truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def flipped(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    return bytes(damaged)


def garbled_scan(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 64 + data[middle + 64 :]


def gif_with_screen(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen, which Pillow takes as the size
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    return raw_png(width, height, 8, 0, b"\0" * 9)  # a tiny IDAT behind a huge header


def png_text_bomb() -> bytes:
    bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 20_000_000))  # 20 MB of text in ~20 KB
    return raw_png(2, 2, 8, 0, b"\0\0\0" * 2, bomb)


# name -> (bytes, reason)
BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero_bytes": (lambda: b"", "empty"),
    "text": (lambda: b"title,artist\nSunflowers,van Gogh\n", "not_an_image"),
    "html_error_page": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not_an_image"),
    "pdf": (lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", "not_an_image"),
    "random_bytes": (lambda: np.random.default_rng(1).bytes(4096), "not_an_image"),
    "heic": (lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "unsupported"),
    "svg": (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported"),
    "jpeg_cut_in_half": (lambda: truncated(encode(photo(), "JPEG"), 0.5), "truncated"),
    "jpeg_cut_in_header": (lambda: encode(photo(), "JPEG")[:20], "truncated"),
    "jpeg_garbled_scan": (lambda: garbled_scan(encode(photo(), "JPEG")), "corrupt"),
    "png_cut_in_half": (lambda: truncated(encode(photo(), "PNG"), 0.5), "truncated"),
    "png_cut_in_header": (lambda: encode(photo(), "PNG")[:30], "truncated"),
    "png_bad_header_crc": (lambda: flipped(encode(photo(), "PNG"), 20), "corrupt"),
    "png_bad_data_crc": (lambda: flipped(encode(photo(), "PNG"), 200), "corrupt"),
    "gif_cut": (lambda: truncated(encode(photo().convert("P"), "GIF"), 0.5), "truncated"),
    "webp_cut": (lambda: truncated(encode(photo(), "WEBP"), 0.5), "truncated"),
    "tiff_cut": (lambda: truncated(encode(photo(), "TIFF", compression="tiff_deflate"), 0.5), "truncated"),
    "bmp_cut": (lambda: truncated(encode(photo(), "BMP"), 0.5), "truncated"),
    "png_bomb_100k_square": (lambda: png_declaring(100_000, 100_000), "too_many_pixels"),
    "gif_bomb_screen": (lambda: gif_with_screen(65_535, 65_535), "too_many_pixels"),
    "png_text_bomb": (png_text_bomb, "decompression_bomb"),
}


def assert_rgb(array: np.ndarray | None, size: int = SIZE) -> np.ndarray:
    assert array is not None
    assert array.shape == (size, size, 3) and array.dtype == np.uint8
    return array


@pytest.mark.parametrize("name", GOOD)
def test_good_files_decode_to_the_requested_square(name: str) -> None:
    make, fmt, (width, height), centre = GOOD[name]
    decoded = decode_image(make(), SIZE)
    assert decoded.error is None, decoded.message
    assert decoded.ok and decoded.message is None
    array = assert_rgb(decoded.array)
    assert (decoded.format, decoded.width, decoded.height) == (fmt, width, height)
    if centre is not None:
        np.testing.assert_allclose(array[SIZE // 2, SIZE // 2], centre, atol=12)


@pytest.mark.parametrize("name", BAD)
def test_bad_files_give_their_specific_reason(name: str) -> None:
    make, reason = BAD[name]
    decoded = decode_image(make(), SIZE)
    assert decoded.array is None
    assert decoded.error == reason, decoded.message
    assert decoded.error in ERROR_REASONS
    assert decoded.message


def test_transparency_is_composited_on_white() -> None:
    for data in (
        encode(rgba_with_transparent_corner(), "PNG"),
        encode(rgba_with_transparent_corner(), "WEBP"),
    ):
        array = assert_rgb(decode_image(data, 40).array, 40)
        np.testing.assert_allclose(array[5, 5], (255, 255, 255), atol=3)
        np.testing.assert_allclose(array[35, 35], BLUE, atol=3)
    gif = Image.new("P", (40, 40), 1)
    gif.putpalette([0, 0, 0, *BLUE])
    gif.paste(0, (0, 0, 20, 20))
    array = assert_rgb(decode_image(encode(gif, "GIF", transparency=0), 40).array, 40)
    np.testing.assert_allclose(array[5, 5], (255, 255, 255), atol=3)


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(exif_rotated_jpeg(), SIZE)
    array = assert_rgb(decoded.array)
    assert (decoded.width, decoded.height) == (40, 60)  # as displayed
    np.testing.assert_allclose(array[2, SIZE // 2], RED, atol=40)  # the stored left side is now on top
    np.testing.assert_allclose(array[-3, SIZE // 2], BLUE, atol=40)


def test_shorter_side_is_resized_and_the_centre_kept() -> None:
    stripes = Image.new("RGB", (300, 100), RED)
    stripes.paste(BLUE, (100, 0, 200, 100))  # the centre third: what a centre crop of the 1:3 image keeps
    array = assert_rgb(decode_image(encode(stripes, "PNG"), 50).array, 50)
    np.testing.assert_allclose(array[:, 3:-3].reshape(-1, 3).mean(0), BLUE, atol=2)


def test_pixel_limit_counts_what_draft_decodes() -> None:
    scan = encode(photo(2048, 1536), "JPEG", quality=85)  # 3.1 MP, drafted to 1/8 for 128 px: 256 x 192
    drafted = decode_image(scan, 128, max_pixels=200_000)
    assert drafted.ok and (drafted.width, drafted.height) == (2048, 1536)
    assert_rgb(drafted.array, 128)
    full = decode_image(scan, 128, max_pixels=200_000, draft=False)
    assert full.error == "too_many_pixels" and (full.width, full.height) == (2048, 1536)
    assert "max_pixels=200,000" in (full.message or "")
    png = decode_image(encode(photo(640, 480), "PNG"), 128, max_pixels=200_000)  # no draft for PNG
    assert png.error == "too_many_pixels"


def test_draft_and_full_decoding_agree() -> None:
    scan = encode(photo(1600, 1200, seed=3), "JPEG", quality=90)
    drafted = assert_rgb(decode_image(scan, 64).array, 64).astype(np.float32)
    full = assert_rgb(decode_image(scan, 64, draft=False).array, 64).astype(np.float32)
    assert np.abs(drafted - full).mean() < 6


def test_pillow_global_limit_is_left_as_it_was() -> None:
    before = Image.MAX_IMAGE_PIXELS
    decode_image(png_declaring(100_000, 100_000), SIZE)
    decode_image(encode(photo(), "JPEG"), SIZE)
    assert Image.MAX_IMAGE_PIXELS == before


def test_damaged_bytes_never_raise() -> None:
    rng = np.random.default_rng(7)
    sources = [encode(photo(64, 48), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")]
    for source in sources:
        for _ in range(15):
            damaged = bytearray(source)
            for at in rng.integers(0, len(damaged), size=int(rng.integers(1, 12))):
                damaged[at] = int(rng.integers(0, 256))
            cut = bytes(damaged[: int(rng.integers(1, len(damaged) + 1))])
            decoded = decode_image(cut, 16)
            if decoded.ok:
                assert_rgb(decoded.array, 16)
            else:
                assert decoded.error in ERROR_REASONS and decoded.array is None


def test_invalid_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="size"):
        decode_image(b"", 0)


def test_center_crop() -> None:
    array = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    crop = center_crop(array, 3)
    assert crop.shape == (3, 3, 3)
    np.testing.assert_array_equal(crop, array[1:4, 2:5])
    batch = np.stack([array, array])
    assert center_crop(batch, 5).shape == (2, 5, 5, 3)
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(array, 6)
