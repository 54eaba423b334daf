"""The few `torchvision.transforms` diffusers' example training scripts use (Compose, Resize, CenterCrop, RandomCrop,
RandomHorizontalFlip, Lambda, ToTensor, Normalize), on PIL images with torchvision's semantics for the arguments
those scripts pass (an int size resizes the shorter side; crops are squares).

torchvision does not install beside this machine's CPU torch build, so `diffusers_script.py` puts this module in
its place to time diffusers' scripts. Benchmarks only: sdtune never imports it."""

from __future__ import annotations

import enum

import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.Resampling.NEAREST
    BILINEAR = Image.Resampling.BILINEAR
    BICUBIC = Image.Resampling.BICUBIC
    LANCZOS = Image.Resampling.LANCZOS


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int size resizes the shorter side to it, keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size, self.resample = size, interpolation.value

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width <= height:
            size = (self.size, int(self.size * height / width))
        else:
            size = (int(self.size * width / height), self.size)
        return image if size == image.size else image.resize(size, self.resample)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left = int(torch.randint(0, width - self.size + 1, (1,)))
        top = int(torch.randint(0, height - self.size + 1, (1,)))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1).item() < self.p else image


class Lambda:
    def __init__(self, function):
        self.function = function

    def __call__(self, image):
        return self.function(image)


class ToTensor:
    """RGB PIL image → float32 C×H×W in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return data.view(height, width, 3).permute(2, 0, 1).float().div(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


__all__ = ["CenterCrop", "Compose", "InterpolationMode", "Lambda", "Normalize", "RandomCrop", "RandomHorizontalFlip",
           "Resize", "ToTensor"]
