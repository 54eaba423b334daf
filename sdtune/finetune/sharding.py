"""Sharded training (FSDP2): each process holds 1/N of the weights that train, their gradients and optimizer state.

`--trainer.strategy fsdp` means `FSDP` here, on a GPU machine and on a CPU one alike (processes talk over NCCL on
GPUs, gloo on CPU), so tests and CPU users run the code path GPUs run. It is Lightning's `ModelParallelStrategy`
(PyTorch's `fully_shard`, FSDP2) with the parallelism applied by sdtune rather than by a `configure_model` hook:

- What is sharded: every part that trains (the denoiser, and a text encoder that trains or carries a LoRA), one
  FSDP unit per block (a UNet's transformer and residual blocks, SD3's and Flux's transformer blocks, CLIP's
  layers) and one for the rest of the part. FSDP2 shards per parameter, so frozen base weights and LoRA weights
  share a unit. Frozen parts (the VAE, a frozen text encoder, T5) are not sharded: each process keeps its copy.
- Checkpoints are sharded: `checkpoints/last.ckpt/` is a folder, one file of trained weights and optimizer state
  per process (torch.distributed.checkpoint) and `meta.pt` with everything else (step, loops, random states). It is
  written to a hidden sibling folder and renamed into place, as single-file checkpoints are.
- Exports and samples: `gathered(module)` all-gathers the weights on every process (each must call it), after
  which rank 0 writes the adapter or model once; sampling runs the denoiser on every process (its forward
  all-gathers each block), rank 0 writes the images.

Lightning's own `FSDPStrategy` (FSDP1) refuses a CPU accelerator and wraps the whole module, frozen VAE included,
into flat parameters whose names and `requires_grad` mix badly with LoRA; FSDP2 keeps every parameter's name, so
the run's `state_dict()` (what trains) and the adapter files are written as without sharding.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from sdtune.errors import SdtuneError

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
SHARDS_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shards


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds parameters sharded by `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def blocks() -> tuple[type, ...]:
    """The classes each made one FSDP unit: the transformer and residual blocks of the UNets, SD3's and Flux's
    transformers and CLIP's layers (units of at most 49 M parameters in SDXL's UNet, 340 M in Flux.1's)."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return (BasicTransformerBlock, ResnetBlock2D, JointTransformerBlock, FluxTransformerBlock,
            FluxSingleTransformerBlock, CLIPEncoderLayer)  # fmt: skip


def sharded_parts(module: torch.nn.Module) -> list[str]:
    """The names of the parts of an sdtune training method that hold a weight that trains."""
    names = [module.family.denoiser, *module.family.text_encoders]
    parts = [(name, module._modules.get(name)) for name in names]
    return [name for name, part in parts if part is not None and any(p.requires_grad for p in part.parameters())]


def shard(module: torch.nn.Module, mesh: Any) -> list[str]:
    """`fully_shard` the parts of `module` that train over `mesh`: each of its `blocks()`, then the rest of the part.
    Returns the parts' names. A trained weight outside them (a new token's embedding row) is refused: its gradients
    would not be averaged across processes."""
    from torch.distributed.fsdp import fully_shard

    names = sharded_parts(module)
    for name in names:
        part = module._modules[name]
        for block in [m for m in part.modules() if isinstance(m, blocks())]:
            fully_shard(block, mesh=mesh)
        fully_shard(part, mesh=mesh)  # what is left: embeddings, norms, in/out projections, up/downsamplers
    outside = [n for n, p in module.named_parameters() if p.requires_grad and n.split(".")[0] not in names]
    if outside:
        raise SdtuneError(
            f"trainer.strategy fsdp shards the denoiser and text encoders; {outside[0]} trains outside them: "
            "use --trainer.strategy ddp for this method"
        )
    return names


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """`module`'s sharded parameters replaced by whole copies under their own names for the duration (to save or
    read them), the shards put back after. Collective: every process must enter it. No-op unsharded.

    FSDP2's own `unshard()` does not serve here: `state_dict()` (which every writer calls) puts the shards back
    first, through hooks that are set aside meanwhile."""
    from torch.distributed.tensor import DTensor

    sharded = [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if isinstance(p, DTensor)]
    hooks = [(m, m._state_dict_pre_hooks) for m in module.modules() if m._state_dict_pre_hooks]
    try:
        for owner, name, param in sharded:  # the same order on every process: one all-gather each
            owner._parameters[name] = torch.nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
        for owner, _ in hooks:
            owner._state_dict_pre_hooks = OrderedDict()
        yield
    finally:
        for owner, saved in hooks:
            owner._state_dict_pre_hooks = saved
        for owner, name, param in sharded:
            owner._parameters[name] = param


class FSDP(ModelParallelStrategy):
    """FSDP2 data parallelism over every process (CPU or GPU), sdtune's parts sharded by `shard`, and checkpoints
    written whole or not at all. `--trainer.strategy fsdp` selects it; it takes no settings.

    Memory per process: the sharded parts' weights, gradients and optimizer state divided by the number of
    processes, plus the weights of the block running and the next one (gathered), plus the frozen parts whole."""

    def __init__(self) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process is one data-parallel shard
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        # ModelParallelStrategy.setup without its `configure_model` requirement: sdtune applies `shard` here.
        self.accelerator.setup(trainer)
        # Sharded first (fully_shard moves each shard to the mesh's device), so no device ever holds a whole part
        # that trains; then the frozen parts move.
        names = shard(self.lightning_module, self.device_mesh["data_parallel"])
        self.model.to(self.root_device)
        rank_zero_info(f"fsdp: {', '.join(names)} sharded over {self.world_size} processes")
        self.model = self.precision_plugin.convert_module(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the sharded checkpoint into `.<name>.partial/`, then put it in place of `<name>` (rank 0)."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.is_global_zero:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(partial, path)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # The weights are loaded into the sharded parameters already; the method's checks of what a checkpoint
        # holds (`ModelFineTune.on_load_checkpoint`) see them under their names.
        checkpoint["state_dict"] = self.lightning_module.state_dict()
        return checkpoint


def resolve_strategy(config: Any) -> None:
    """`trainer.strategy: fsdp` (as on a GPU machine) → sdtune's `FSDP`, which also runs on CPU; set in place on a
    parsed `fit`/`validate` config (a Namespace), before its checks and before anything is built. Any other value
    is left as it is."""
    from jsonargparse import Namespace

    if config.get("trainer.strategy") == "fsdp":
        config["trainer.strategy"] = Namespace(class_path=f"{__name__}.{FSDP.__qualname__}", init_args=Namespace())
