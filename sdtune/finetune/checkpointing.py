"""Checkpoints that survive crashes: written whole or not at all, checked before anything older is pruned, and a
damaged `last.ckpt` skipped on resume.

`AtomicCheckpointIO` is the Trainer's checkpoint writer. Every file (`last.ckpt`, the top-k files, the ones written
on SIGTERM) goes to a hidden sibling first, is flushed and fsynced, read back through its zip checksums, and only
then renamed over its final name, so a kill at any moment leaves either the old complete file or the new complete
file. ModelCheckpoint deletes older files only after the save returns, that is after the new file has passed.

`pick_resume_checkpoint` is what `--ckpt_path last` resolves to: the newest checkpoint in the run's checkpoint
folder that passes the same check, with a warning for every newer one it had to skip.

Reading never runs code from a file: every load passes `weights_only=True` itself (so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD,
which only changes torch's default, cannot turn unpickling back on), and `read_checkpoint` says in one line why a
file given to resume from is unusable: damaged, not a checkpoint, or pickling Python objects.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from sdtune.errors import RESUME_ADVICE, SdtuneError, first_line, pickled_objects, refused_pickle, write_refused
from sdtune.finetune.sharding import META_FILE, SHARDS_INDEX


def state_file(path: str | Path) -> Path:
    """The file holding a checkpoint's training state (step, loops, random states): the checkpoint itself, or a
    sharded checkpoint folder's `meta.pt`."""
    path = Path(path)
    return path / META_FILE if path.is_dir() else path


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint (missing, empty, truncated, a bad checksum), or None if it is.

    torch.save writes a zip archive; reading every member against its CRC finds truncation and bit rot without
    unpickling anything. A sharded checkpoint (a folder, `trainer.strategy fsdp`) is complete when its shards'
    index and its `meta.pt` are."""
    path = Path(path)
    if path.is_dir():
        if not (path / SHARDS_INDEX).is_file():
            return f"a folder without {SHARDS_INDEX}, not a sharded checkpoint"
        return checkpoint_problem(state_file(path))
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return "the file does not exist"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"not a complete checkpoint, truncated or never one ({first_line(err)})"
    if bad is not None:
        return f"a checksum does not match ({bad})"
    return None


def nonfinite_weights(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state_dict` holding a NaN or an infinity."""
    return [
        name for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]  # fmt: skip


def unpickling_error(what: str, err: pickle.UnpicklingError, advice: str = RESUME_ADVICE) -> SdtuneError:
    """One line for a file torch.load(weights_only=True) refused (it pickles Python objects, which can run code when
    unpickled) or could not unpickle, naming `what` (e.g. "--ckpt_path runs/x/last.ckpt") and ending in `advice`,
    instead of torch's advice to pass weights_only=False."""
    found = refused_pickle(err)
    if found is None:
        return SdtuneError(f"{what} is not a checkpoint ({first_line(err)}); {advice}")
    return SdtuneError(f"{what} contains {pickled_objects(found)}; {advice}")


def read_checkpoint(path: str | Path, what: str, resume: bool = True, verified: bool = False) -> dict[str, Any]:
    """A checkpoint file given to resume (or validate) from, read on the CPU (memory-mapped, so the tensors are not
    read): complete (`checkpoint_problem`, unless `verified` says it was just checked), written by torch.save,
    tensors and plain values only, and holding the training state Lightning restores (`resume`: the optimizers'
    too). Every other case is one SdtuneError line naming `what`."""
    problem = None if verified else checkpoint_problem(path)
    if problem is not None:
        raise SdtuneError(f"{what}: {problem}; {RESUME_ADVICE}")
    sharded = Path(path).is_dir()
    try:
        checkpoint = torch.load(state_file(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise unpickling_error(what, err) from err
    except Exception as err:  # a complete zip archive (checked above) that torch.save did not write
        raise SdtuneError(f"{what} is a zip archive but not a checkpoint written by torch.save; {RESUME_ADVICE}") from err
    if sharded and isinstance(checkpoint, dict):  # the weights and optimizer state are in the shards
        checkpoint = {**checkpoint, **sharded_contents(path)}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise SdtuneError(f"{what} is not a training checkpoint (it has no state_dict); {RESUME_ADVICE}")
    if resume and "optimizer_states" not in checkpoint:
        raise SdtuneError(
            f"{what} holds weights but no optimizer state to resume from (written with checkpoint.save_weights_only?); "
            f"{RESUME_ADVICE}"
        )
    return checkpoint


def sharded_contents(folder: str | Path) -> dict[str, Any]:
    """What the shards of a sharded checkpoint hold, by top-level key ("state_dict", "optimizer_0", …), as
    {key: {}}: read from their index, not from the shards."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as err:  # a damaged index
        raise SdtuneError(f"sharded checkpoint {folder}: its {SHARDS_INDEX} cannot be read ({first_line(err)}); {RESUME_ADVICE}") from err
    top = {key.split(".")[0] for key in keys}
    return {key: {} for key in top if key == "state_dict"} | ({"optimizer_states": []} if "optimizer_0" in top else {})


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
    never one whose weights hold NaN or infinity. Loads are weights-only, whatever the Trainer asks."""

    def load_checkpoint(
        self, path: str | Path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # sdtune's checkpoints hold tensors and plain values only (`base.plain`, `rng_state`); Lightning passes
        # weights_only=None, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would turn into unpickling anything.
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise unpickling_error(f"checkpoint {path}", err) from err

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


def checkpoints_newest_first(folder: str | Path) -> list[Path]:
    """The `.ckpt` checkpoints in `folder` (files, and sharded checkpoints' folders), newest first by modification
    time, `last.ckpt` first on a tie; complete or not."""
    folder = Path(folder)
    found = [p for p in folder.glob("*.ckpt") if state_file(p).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)


def newest_checkpoint(folder: str | Path) -> str:
    """'the newest checkpoint is <path> (step N)' for messages, or that there is none yet."""
    newest = next((p for p in checkpoints_newest_first(folder) if checkpoint_problem(p) is None), None)
    if newest is None:
        return "no checkpoint was written yet"
    try:  # memory-mapped: reads the step, not the weights
        step = torch.load(state_file(newest), map_location="cpu", mmap=True, weights_only=True).get("global_step")
    except Exception:
        step = None
    return f"the newest checkpoint is {newest}" + (f" (step {step})" if step is not None else "")


def remove_unfinished(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.partial` files (and sharded checkpoints' folders, `.<name>.old` too) a killed save left in
    `folder` (the run holds its lock); returns them."""
    folder = Path(folder)
    left = sorted([*folder.glob(".*.partial"), *folder.glob(".*.ckpt.old")]) if folder.is_dir() else []
    for path in left:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return left


def pick_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder` (`checkpoints_newest_first`), or None when there is none at all.
    Each newer one that fails `checkpoint_problem` gets a warning; when all fail, an SdtuneError lists why."""
    found = checkpoints_newest_first(folder)
    if not found:
        return None
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
