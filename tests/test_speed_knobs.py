"""Speed knobs change how the work is done, never what is learned: channels_last, an in-place torch.compile of the
UNet, and the DataLoader's pin_memory / persistent workers."""

from functools import partial

import torch

from sdtune.adapters.lora import LoraSettings, lora_state_dict
from sdtune.data import CaptionDataModule
from sdtune.finetune import LoRAFineTune

INPUT = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700]))


def build(tiny_model_dir, **knobs):
    torch.manual_seed(0)
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4), **knobs)


def output(module):
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    return module.unet(*INPUT, text).sample


def test_channels_last_keeps_the_outputs(tiny_model_dir):
    plain, nhwc = build(tiny_model_dir), build(tiny_model_dir, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output(nhwc), output(plain), rtol=1e-5, atol=1e-5)


def test_compile_is_in_place_so_names_and_saved_adapters_stay(tiny_model_dir, monkeypatch):
    # The eager backend runs the graph TorchDynamo captures without generating kernels: the wiring is what is tested.
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    plain, compiled = build(tiny_model_dir), build(tiny_model_dir, compile=True)
    assert compiled.unet._compiled_call_impl is not None and plain.unet._compiled_call_impl is None
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert lora_state_dict(compiled.unet).keys() == lora_state_dict(plain.unet).keys()
    loss = output(compiled).square().mean()
    loss.backward()  # gradients reach the adapter through the compiled call
    assert all(p.grad is not None for p in compiled.unet.parameters() if p.requires_grad)
    torch.testing.assert_close(output(compiled), output(plain), rtol=0, atol=0)


def test_pin_memory_and_persistent_workers_reach_the_loader(tiny_model_dir, shapes_dir):
    common = dict(resolution=32, batch_size=2, pretrained=str(tiny_model_dir))
    loader = CaptionDataModule(str(shapes_dir), num_workers=1, pin_memory=True, **common).train_dataloader()
    assert loader.pin_memory and loader.persistent_workers
    loader = CaptionDataModule(str(shapes_dir), num_workers=1, persistent_workers=False, **common).train_dataloader()
    assert not loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    assert not CaptionDataModule(str(shapes_dir), **common).train_dataloader().persistent_workers  # no workers
