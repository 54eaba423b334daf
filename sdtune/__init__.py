"""sdtune: Stable Diffusion fine-tuning with PyTorch Lightning."""

__version__ = "0.1.0"
