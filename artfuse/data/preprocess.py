"""What a model package expects of its input: size, crop and normalisation, in one place.

Decoding (artfuse.data.images) produces uint8 RGB at `resize` px, centre-cropped square; training crops randomly
to `img_size`, evaluation and labelling crop the centre. The float conversion happens on the model's device,
so uint8 (4x smaller than float32) is what crosses Ray's object store and the host->device copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from artfuse.data.images import center_crop

CROP_FRACTION = 0.875  # timm's default crop_pct: decode at img_size / 0.875, evaluate the centre img_size


@dataclass(frozen=True)
class Preprocess:
    img_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_model(cls, img_size: int, mean, std) -> Preprocess:
        return cls(img_size, int(round(img_size / CROP_FRACTION)), tuple(mean), tuple(std))

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(int(d["img_size"]), int(d["resize"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict:
        return asdict(self)

    def center_crop(self, images: np.ndarray) -> np.ndarray:
        return center_crop(images, self.img_size)

    def to_tensor(
        self, images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW (channels_last memory), on `device`."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        non_blocking = images.is_pinned()
        x = images.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
