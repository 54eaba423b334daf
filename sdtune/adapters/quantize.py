"""QLoRA: the frozen denoiser held quantized (bitsandbytes NF4 or int8) under a LoRA that trains in float32.

Every `nn.Linear` of the denoiser becomes bitsandbytes' `Linear4bit` (NF4 with double-quantized statistics, as
QLoRA) or `Linear8bitLt` with the same weights, quantized; convolutions and norms stay as they are. peft then wraps
the quantized layers' LoRA as for any base layer. The adapter is the same tensors as on the unquantized model:
exports load on the unquantized base. bitsandbytes runs these layers forward and backward on CUDA and on the CPU;
diffusers' own `BitsAndBytesConfig` loading needs a GPU, so sdtune quantizes the loaded layers itself.
"""

from __future__ import annotations

from typing import Literal

import torch

QUANTIZE = ("nf4", "int8")
Quantize = Literal["nf4", "int8"]


def quantize_linears(model: torch.nn.Module, kind: Quantize, compute_dtype: torch.dtype) -> int:
    """Replace each `nn.Linear` of (frozen) `model` with its quantized bitsandbytes twin; returns how many.
    `compute_dtype` is what the NF4 layers dequantize to for their matmul (the frozen weights' dtype)."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data.detach().to("cpu", torch.float32 if kind == "int8" else compute_dtype)
            bias = child.bias
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                            has_fp16_weights=False, threshold=6.0)  # fmt: skip
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if bias is not None:
                layer.bias = torch.nn.Parameter(bias.data.detach().clone(), requires_grad=False)
            layer = layer.to(child.weight.device)  # bitsandbytes quantizes when the weight is moved
            setattr(module, child_name, layer)
            replaced += 1
    # peft picks its bitsandbytes LoRA layers for a model that says it is loaded in 4 or 8 bits.
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return replaced


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take, as stored (quantized layers' packed weights and statistics)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # NF4 absmax (and its own quantization) are kept beside the packed weight
            for value in vars(state).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total
