"""Checkpoints that survive crashes: written whole or not at all, checked before anything older is pruned, and a
damaged `last.ckpt` skipped on resume.

`AtomicCheckpointIO` is the Trainer's checkpoint writer. Every file (`last.ckpt`, the top-k files, the ones written
on SIGTERM) goes to a hidden sibling first, is flushed and fsynced, read back through its zip checksums, and only
then renamed over its final name, so a kill at any moment leaves either the old complete file or the new complete
file. ModelCheckpoint deletes older files only after the save returns, that is after the new file has passed.

`pick_resume_checkpoint` is what `--ckpt_path last` resolves to: the newest checkpoint in the run's checkpoint
folder that passes the same check, with a warning for every newer one it had to skip.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from sdtune.errors import SdtuneError, first_line, write_refused


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint (missing, empty, truncated, a bad checksum), or None if it is.

    torch.save writes a zip archive; reading every member against its CRC finds truncation and bit rot without
    unpickling anything."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return "the file does not exist"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"not a complete checkpoint ({first_line(err)})"
    if bad is not None:
        return f"a checksum does not match ({bad})"
    return None


def nonfinite_weights(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state_dict` holding a NaN or an infinity."""
    return [
        name for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]  # fmt: skip


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.partial`, fsync, verify, rename over `<name>`: never a half-written checkpoint, and
    never one whose weights hold NaN or infinity."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        bad = nonfinite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise SdtuneError(
                f"not writing {path}: {len(bad)} weight tensors hold NaN or infinity ({', '.join(bad[:3])}); "
                "the checkpoints already in its folder are unchanged"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            problem = checkpoint_problem(partial)
            if problem is not None:
                raise SdtuneError(f"checkpoint {path} failed its check after writing: {problem}; disk full or failing?")
            os.replace(partial, path)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            refused = write_refused(err)
            if refused is None:
                raise
            raise SdtuneError(
                f"could not write checkpoint {path} ({refused}); {newest_checkpoint(path.parent)}: free space or fix "
                "permissions, then run the same command with --ckpt_path last to continue"
            ) from err
        _fsync_dir(path.parent)


def newest_checkpoint(folder: str | Path) -> str:
    """'the newest checkpoint is <path> (step N)' for messages, or that there is none yet."""
    found = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if Path(folder).is_dir() else []
    found = [p for p in found if checkpoint_problem(p) is None]
    if not found:
        return "no checkpoint was written yet"
    try:  # memory-mapped: reads the step, not the weights
        step = torch.load(found[-1], map_location="cpu", mmap=True, weights_only=True).get("global_step")
    except Exception:
        step = None
    return f"the newest checkpoint is {found[-1]}" + (f" (step {step})" if step is not None else "")


def remove_unfinished(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.partial` files a killed save left in `folder` (the run holds its lock); returns them."""
    folder = Path(folder)
    left = sorted(folder.glob(".*.partial")) if folder.is_dir() else []
    for path in left:
        path.unlink(missing_ok=True)
    return left


def pick_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete `.ckpt` in `folder` (by modification time, `last.ckpt` first on a tie), or None when
    there is none at all. Each newer one that fails `checkpoint_problem` gets a warning; when all fail, an
    SdtuneError lists why."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    if not found:
        return None
    found.sort(key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)
    skipped: list[str] = []
    for candidate in found:
        problem = checkpoint_problem(candidate)
        if problem is None:
            for note in skipped:
                rank_zero_warn(f"{note}; resuming from {candidate.name} instead")
            return candidate
        skipped.append(f"checkpoint {candidate} is damaged ({problem})")
    raise SdtuneError(
        f"no usable checkpoint in {folder}: " + "; ".join(skipped) + "; start without --ckpt_path or restore a backup"
    )


def resume_after_last_batch(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written after an epoch's loop finished (at train end, on the epoch-end save, or when a stop
    signal arrived there) resume like one written right after its last batch. Returns whether it changed anything.

    Lightning resumes step-based training exactly from a checkpoint saved at a batch's end (mid-epoch, or the
    epoch's last batch). Saved after the epoch's loop has ended instead, its loop counters already count the epoch
    as processed and the last batch as completed; a resume then runs an empty epoch and trains the next one with
    the epoch after's data order and noise (the run drifts from an unbroken one, and the checkpoint counts two
    epochs too many). The counters are set back to the batch-end shape: the epoch started but not processed, the
    last batch processed but not completed, which Lightning completes on restart."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit:
        return False
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    epoch_ended = epochs["total"]["processed"] == epochs["total"]["started"] > 0
    batch_done = batches["total"]["completed"] == batches["total"]["processed"] == batches["total"]["started"] > 0
    if not (epoch_ended and batch_done):
        return False
    for counts in (epochs["total"], epochs["current"]):
        counts["processed"] -= 1
        counts["completed"] = min(counts["completed"], counts["processed"])
    for counts in (batches["total"], batches["current"]):
        counts["completed"] -= 1
    fit["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    return True
