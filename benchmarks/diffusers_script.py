"""Run one of diffusers' example training scripts where torchvision cannot be installed.

    python benchmarks/diffusers_script.py PATH/TO/train_text_to_image_lora.py --pretrained_model_name_or_path ... [args]

The scripts use torchvision only for a handful of PIL transforms. This launcher imports datasets, accelerate,
transformers, diffusers and peft first (so they see no torchvision and do not use it), then registers `pil_transforms` as `torchvision.transforms`
and runs the script as `__main__` with the remaining arguments. diffusers' scripts are not part of its pip package:
take the script from the diffusers release you have installed (github.com/huggingface/diffusers, examples/).

With $SDTUNE_BENCH_TIMES set, the end time of every optimizer step is written there as a JSON list when the script
exits (the measure `train_loop.py` uses for every run).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import sys
import time
import types
from pathlib import Path

# Imported before the stand-in exists, so each library's "is torchvision installed?" check comes out False.
for name in ("datasets", "accelerate", "transformers", "diffusers", "diffusers.training_utils", "peft"):
    importlib.import_module(name)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pil_transforms  # noqa: E402


def record_step_ends(path: str) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    ends: list[float] = []
    register_optimizer_step_post_hook(lambda *args: ends.append(time.perf_counter()))
    atexit.register(lambda: Path(path).write_text(json.dumps(ends)))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) > 1 else 2)
    script = sys.argv[1]
    if not Path(script).is_file():
        sys.exit(f"diffusers_script: no such script '{script}'")
    package = types.ModuleType("torchvision")
    package.transforms = pil_transforms
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = pil_transforms
    if os.environ.get("SDTUNE_BENCH_TIMES"):
        record_step_ends(os.environ["SDTUNE_BENCH_TIMES"])
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
