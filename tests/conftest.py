"""Shared fixtures: a tiny random Stable Diffusion and a generated captioned dataset, built once per session."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach the network; a hub id must fail fast instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
# The tiny models are too small to gain from intra-op threads; on 2 shared cores the second thread only contends. The
# environment variable carries this to every `sdtune` subprocess: with two OpenMP threads and the other core busy, each
# small op waits for a descheduled thread, and a 4-step sample of the tiny model measured 53 s instead of 1.9 s.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# Lightning's console handler writes to the stderr of the moment Lightning is first imported; imported here, that is the
# process's own, as in a command-line run, and not the captured stream of whichever test imports it first.
importlib.import_module("lightning.pytorch")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from sdtune.models.tiny import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from sdtune.toy.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", count=8, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from sdtune.models.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    from sdtune.models.tiny_sd2 import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from sdtune.models.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from sdtune.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")
