"""Exporting adapters: diffusers, peft and kohya (A1111/ComfyUI) files, or a merged pipeline, each checked on write."""
