"""Image preprocessing with PIL and torch only (no torchvision), as pure functions that are easy to test.

Opening and converting files is `sdtune.data.images`; this is what happens to the RGB image after that.

Randomness is passed in (a `torch.Generator` or pre-drawn uniforms) so a sample is a function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest size with the image's aspect ratio that covers `target` (width, height) on both sides."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


def crop_box(
    width: int, height: int, target: tuple[int, int], center: bool, uniforms: tuple[float, float] = (0.5, 0.5)
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) `target`-sized box to keep. Random crops map two uniforms in [0, 1) to offsets."""
    slack_x, slack_y = width - target[0], height - target[1]
    if center:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = min(int(uniforms[0] * (slack_x + 1)), slack_x)
        top = min(int(uniforms[1] * (slack_y + 1)), slack_y)
    return left, top, left + target[0], top + target[1]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 3xHxW in [-1, 1], the range the VAE was trained on."""
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class Geometry:
    """One sample's resize, crop box and flip, decided once so an image and its mask get exactly the same ones."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool

    @classmethod
    def plan(
        cls, size: tuple[int, int], target: int | tuple[int, int], center_crop: bool, flip: bool,
        uniforms: tuple[float, float],
    ) -> Geometry:  # fmt: skip
        """Resize to just cover `target` ((width, height) or a square's side) keeping the aspect ratio, then crop a
        centred or (`uniforms`-placed) random box of that size; `flip` as drawn. A square target resizes the shorter
        side to it; a bucket target's aspect ratio is close to the image's, so little is cropped."""
        target = (target, target) if isinstance(target, int) else tuple(target)
        resized = cover_size(*size, target)
        return cls(resized, crop_box(*resized, target, center_crop, uniforms), flip)

    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the kept box in the resized image as the model sees it (mirrored when flipped): what SDXL's
        crop conditioning is told."""
        left, top, right, _ = self.box
        return top, (self.resized[0] - right if self.flip else left)

    def apply(self, image: Image.Image, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
        """Resize (`resample`: LANCZOS for photos, BILINEAR for masks, whose values are weights), crop, flip."""
        if image.size != self.resized:
            image = image.resize(self.resized, resample=resample)
        image = image.crop(self.box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else image


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """'L' PIL mask -> float32 1xHxW in [0, 1]: white (255) is full loss weight, black none."""
    width, height = mask.size
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
    return data.view(1, height, width).float().div(255.0)


def preprocess(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize, crop to `resolution` square, optionally flip, and convert. A random crop needs `generator`."""
    uniforms = (0.5, 0.5)
    if not center_crop:
        if generator is None:
            raise ValueError("a random crop needs a torch.Generator")
        uniforms = tuple(torch.rand(2, generator=generator).tolist())
    return to_tensor(Geometry.plan(image.size, resolution, center_crop, flip, uniforms).apply(image))
