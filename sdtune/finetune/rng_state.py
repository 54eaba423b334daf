"""The random states a training step draws from, saved per process in checkpoints so a resume continues every
stream exactly where it stopped.

Each rank has its own: the module's noise generator (seeded per rank; used only by batches without sample keys, as
the DataModule's samples each seed their own draws) and the global torch (CPU and CUDA), numpy and Python generators
(LoRA dropout draws from torch's). Every rank's states are gathered
when a checkpoint is written and each rank takes back its own on resume. Stored as tensors and plain numbers, so a
checkpoint still loads with `torch.load(weights_only=True)`.

The DataLoaders get their own generator (see `CaptionDataModule`), so creating an epoch's iterator does not draw
from torch's global generator and a resumed run's draws line up with the uninterrupted run's.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def local_states(generator: torch.Generator) -> dict[str, Any]:
    """This process's random states."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python, gauss = random.getstate()
    states = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "python": {"version": version, "state": torch.tensor(python, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_states(generator: torch.Generator) -> list[dict[str, Any]]:
    """Every rank's `local_states`, in rank order (a collective call under DDP: every rank must make it)."""
    mine = local_states(generator)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_states(saved: list[dict[str, Any]], rank: int, world_size: int) -> torch.Tensor | None:
    """Set the global generators to this rank's saved states; returns its noise generator's state. A checkpoint
    from another number of processes cannot be continued exactly: warn and return None (generators start from
    their seeds)."""
    if len(saved) != world_size:
        rank_zero_warn(
            f"the checkpoint was written by {len(saved)} process(es), this run has {world_size}: random states start "
            "from their seeds, so the run continues, but not as the original would have"
        )
        return None
    state = saved[rank]
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))  # fmt: skip
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["generator"]


@contextmanager
def untouched(module: torch.nn.Module) -> Iterator[None]:
    """Restore on exit: global random states, the module's `noise_generator`, each submodule's mode and every
    parameter's requires_grad, so a callback that samples or measures leaves training exactly as it was."""
    python_state, numpy_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    generator = getattr(module, "noise_generator", None)
    generator_state = generator.get_state() if isinstance(generator, torch.Generator) else None
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if generator_state is not None:
            generator.set_state(generator_state)
