"""Image preprocessing with PIL and torch only (no torchvision), as pure functions that are easy to test.

Randomness is passed in (a `torch.Generator` or pre-drawn uniforms) so a sample is a function of its seed.
"""

from __future__ import annotations

from typing import IO

import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def load_rgb(source: str | IO[bytes]) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB; transparency becomes white, not black."""
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (the long side is never below `size`)."""
    width, height = image.size
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    if target == image.size:
        return image
    return image.resize(target, resample=resample)


def crop_box(
    width: int, height: int, size: int, center: bool, uniforms: tuple[float, float] = (0.5, 0.5)
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square to keep. Random crops map two uniforms in [0, 1) to offsets."""
    slack_x, slack_y = width - size, height - size
    if center:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = min(int(uniforms[0] * (slack_x + 1)), slack_x)
        top = min(int(uniforms[1] * (slack_y + 1)), slack_y)
    return left, top, left + size, top + size


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 3xHxW in [-1, 1], the range the VAE was trained on."""
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


def preprocess(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize, crop to `resolution` square, optionally flip, and convert. A random crop needs `generator`."""
    image = resize_shorter_side(image, resolution)
    uniforms = (0.5, 0.5)
    if not center_crop:
        if generator is None:
            raise ValueError("a random crop needs a torch.Generator")
        uniforms = tuple(torch.rand(2, generator=generator).tolist())
    image = image.crop(crop_box(*image.size, resolution, center_crop, uniforms))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
