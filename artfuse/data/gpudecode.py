"""JPEG decoding on the model actor's GPU (nvJPEG through torchvision) for labelling; the CPU stage only reads.

`images.decode_image` stays the reference decoder. A JPEG goes to the GPU only when its header shows nothing
the GPU path would treat differently (`gpu_decodable`: EXIF rotation, CMYK, a cut upload, a scan too large to
decode whole); the CPU stage decodes everything else and ships those rows as raw pixels, and a JPEG that nvJPEG
refuses is decoded by `decode_image` here. The output matches `decode_image`: centre square, resized to
size x size, uint8 RGB.

The CPU read stage imports this module for `gpu_decodable` and the encodings, and must stay without torch (a
decode worker is a few hundred MB lighter): torch and torchvision are imported by the functions that run in
the model actor.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image

from artfuse.data.images import decode_image, jpeg_complete

if TYPE_CHECKING:
    import torch

GPU_JPEG = "jpeg"  # `encoding` of a row whose `encoded` bytes are a JPEG left for the GPU to decode
RAW = "raw"  # `encoding` of a row decoded on CPU: `encoded` holds its size x size x 3 uint8 pixels
JPEG_MAGIC = b"\xff\xd8\xff"

# JPEGs per nvJPEG call: their full-size pixels live on the GPU until resized (64 x 16 MP is 3 GB at most)
DECODE_CHUNK = 64


def gpu_decodable(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when `data` is a JPEG that the GPU decodes as `decode_image` would: complete, RGB or
    grey, upright (EXIF orientation 1) and at most `max_pixels`; else None. Reads the header only."""
    # A cut upload has no end-of-image marker: decode_image names it truncated, the GPU would fill it in grey.
    if not data.startswith(JPEG_MAGIC) or not jpeg_complete(data):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            if im.mode not in ("RGB", "L") or im.width * im.height > max_pixels:
                return None
            if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                return None
            return im.size
    except Exception:  # anything odd goes the CPU way, where decode_image names the problem
        return None


def decode_jpegs(datas: Sequence[bytes], size: int, device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> (size, size, 3) uint8 tensors on `device` (None where the decoder refuses an image)."""
    out: list[torch.Tensor | None] = []
    for start in range(0, len(datas), DECODE_CHUNK):
        chunk = datas[start : start + DECODE_CHUNK]
        out += [None if image is None else _square(image, size) for image in _decode(chunk, device)]
    return out


def _decode(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    # bytearray: torch.frombuffer wants a writable buffer; the copy is small next to the decode
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the whole batched call: find it image by image
        decoded: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def to_device(
    encoded: Sequence[bytes], encoding: Sequence[str], size: int, device: torch.device, *, max_pixels: int
) -> tuple[torch.Tensor, dict[int, str]]:
    """A batch from `stages.read_for_gpu_decode` -> (N, size, size, 3) uint8 on `device`, and {row: error}
    for the JPEGs that neither nvJPEG nor `decode_image` could decode (their pixels are zeros)."""
    import torch

    images = torch.zeros((len(encoded), size, size, 3), dtype=torch.uint8, device=device)
    raw = [i for i, kind in enumerate(encoding) if kind == RAW]
    if raw:
        pixels = np.stack([np.frombuffer(encoded[i], np.uint8) for i in raw]).reshape(-1, size, size, 3)
        host = torch.from_numpy(pixels)
        images[raw] = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
    jpegs = [i for i, kind in enumerate(encoding) if kind == GPU_JPEG]
    errors: dict[int, str] = {}
    for i, image in zip(jpegs, decode_jpegs([encoded[i] for i in jpegs], size, device), strict=True):
        if image is None:
            image, errors_i = _decode_on_cpu(encoded[i], size, max_pixels)
            if errors_i:
                errors[i] = errors_i
                continue
            image = image.to(device)
        images[i] = image
    return images, errors


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> its centre square resized to (size, size, 3), as decode_image crops and resizes."""
    import torch
    import torch.nn.functional as F

    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top : top + side, left : left + side].unsqueeze(0).float()
    resized = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def _decode_on_cpu(data: bytes, size: int, max_pixels: int) -> tuple[torch.Tensor | None, str | None]:
    import torch

    decoded = decode_image(data, size, max_pixels=max_pixels)
    if decoded.error:
        return None, f"{decoded.error}: {decoded.message}" if decoded.message else decoded.error
    return torch.from_numpy(decoded.array), None
