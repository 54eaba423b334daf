"""Adapters on the denoiser and the text encoders: LoRA/DoRA/LoCon settings on peft, starting from a file, new tokens."""
