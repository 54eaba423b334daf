"""What `sdtune report` shows of a run directory, read from the files `sdtune fit` wrote there (nothing is loaded
onto a device, nothing is trained):

- `config.yaml`: the resolved config, shown as written; its `samples:` and `adapter:` blocks say where to look;
- `logs/`: every scalar TensorBoard holds (train/loss, val/loss, lr-*, perf/*), read with TensorBoard's own
  EventAccumulator, which also drops the steps a resumed run logged again;
- `samples/step_NNNNNN/grid.png`: the sample grids, by step;
- `adapter/`, `adapter_ema/`, `model/`, `model_ema/`: each file with its size, and for each weights file what
  `sdtune inspect` finds (format, model family, which tools read it) or why it could not be read.

A piece the run has not written yet (no logs, no samples, no adapter) is left empty, not an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdtune.errors import SdtuneError, first_line

STEP_FOLDER = re.compile(r"step_(\d+)$")
OUTPUT_FOLDERS = ("adapter", "adapter_ema", "model", "model_ema")


@dataclass
class Grid:
    step: int
    png: bytes


@dataclass
class OutputFile:
    path: str  # relative to the run directory
    size: int
    check: str | None = None  # what `sdtune inspect` says of a weights file, or why it could not read it
    readers: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    path: Path
    config_text: str
    scalars: dict[str, list[tuple[int, float]]]
    grids: list[Grid]
    outputs: list[OutputFile]
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def read_run(path: str | Path) -> Run:
    """Everything the report shows of the run directory `path`; a folder that is no run is one SdtuneError line."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SdtuneError(f"{path} is not a folder; give the run directory of `sdtune fit` (its trainer.default_root_dir)")
    config_file = path / "config.yaml"
    config = _run_config(config_file) if config_file.is_file() else None
    if config is None:
        raise SdtuneError(f"{path} is not an sdtune run directory (no config.yaml with a model section)")
    samples = config.get("samples") if isinstance(config.get("samples"), dict) else {}
    adapter = config.get("adapter") if isinstance(config.get("adapter"), dict) else {}
    return Run(
        path=path,
        config_text=config_file.read_text(encoding="utf-8"),
        scalars=read_scalars(path / "logs"),
        grids=read_grids(path / str(samples.get("dirname") or "samples")),
        outputs=read_outputs(path, adapter.get("dirname")),
        prompts=[str(prompt) for prompt in samples.get("prompts") or []] if samples.get("enabled") else [],
        seeds=[int(seed) for seed in samples.get("seeds") or []] if samples.get("enabled") else [],
    )


def _run_config(file: Path) -> dict | None:
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("model"), dict) else None


def read_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files under `logs` ({} when none)."""
    if not any(logs.glob("**/events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 0 keeps every scalar; the images (the grids, also on disk) are not needed here.
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_grids(samples: Path) -> list[Grid]:
    """The sample grid of every step folder under `samples`, in step order."""
    grids = []
    for folder in samples.glob("step_*"):
        step = STEP_FOLDER.match(folder.name)
        if step and (folder / "grid.png").is_file():
            grids.append(Grid(int(step.group(1)), (folder / "grid.png").read_bytes()))
    return sorted(grids, key=lambda grid: grid.step)


def read_outputs(run: Path, dirname: str | None) -> list[OutputFile]:
    """Every file of the run's adapter and model folders with its size; weights files with `sdtune inspect`'s
    findings (a full model's folders are inspected as the pipeline they form)."""
    from sdtune.export.inspect import inspect

    names = dict.fromkeys([*([dirname, f"{dirname}_ema"] if dirname else []), *OUTPUT_FOLDERS])
    files = []
    for name in names:
        folder = run / name
        if not folder.is_dir():
            continue
        pipelines = [index.parent for index in folder.rglob("model_index.json")]
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            output = OutputFile(str(file.relative_to(run)), file.stat().st_size)
            weights = file.suffix == ".safetensors" and not any(pipeline in file.parents for pipeline in pipelines)
            target = file if weights else file.parent if file.name == "model_index.json" else None
            if target is not None:
                try:
                    report = inspect(target)
                    output.check = f"{report.format}; {report.family}"
                    output.readers = report.readers
                except SdtuneError as err:
                    output.check = f"not readable: {first_line(err)}"
            files.append(output)
    return files
