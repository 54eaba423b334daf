"""One process at a time in a run directory (`sdtune fit`, `sdtune validate`) or a cache folder (`sdtune prep cache`).

Two processes writing one run directory overwrite each other's last.ckpt, config.yaml and TensorBoard logs. The
first one creates `<folder>/.sdtune.lock` atomically (O_CREAT | O_EXCL) with its pid, host, command and start time
and deletes it when it ends (normally, on an error, on SIGTERM or Ctrl+C); a second one refuses in one line.

A lock left by a process of this host that is no longer running (SIGKILL, a power cut) is taken over with a warning.
One from another host cannot be checked from here: the message says which file to delete if that run has ended.
Under DDP only the launching process holds the lock; the ranks a launcher starts run the same command and skip it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError

LOCK_NAME = ".sdtune.lock"
# Set by Lightning's launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK), SLURM and LSF in every process but the first.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
ATTEMPTS = 20


def is_launching_process() -> bool:
    """True unless a distributed launcher started this process as a rank other than the first."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def _start_ticks(pid: int) -> str | None:
    """When the process started (Linux: clock ticks since boot), to tell a reused pid from the lock's holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _running(pid: int) -> bool:
    if os.name != "posix":  # os.kill would signal it; without a safe check, count it as running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and has ended (or its pid now belongs to a process started later)."""
    if holder.get("hostname") != socket.gethostname():
        return False
    pid = int(holder["pid"])
    if not _running(pid):
        return True
    ticks = _start_ticks(pid)
    return holder.get("process_start") is not None and ticks is not None and ticks != holder["process_start"]


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('hostname')}, started {holder.get('started')}"


class RunLock:
    """`with RunLock(folder, "trainer.default_root_dir"):` holds `folder`'s lock; `setting` is the option that moves
    the folder (None when it cannot move), named in the messages."""

    def __init__(self, folder: str | os.PathLike, setting: str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self.setting = setting
        self.text: str | None = None  # what this process wrote, while it holds the lock
        self.pid = os.getpid()
        self._created: list[Path] = []  # folders made for the lock, removed again if they stay empty

    def _name(self) -> str:
        return f"{self.setting} '{self.folder}'" if self.setting else f"'{self.folder}'"

    def acquire(self) -> RunLock:
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._meet_holder()
                continue
            self._write(fd)
            return self
        self._remove_created()
        raise SdtuneError(
            f"{self._name()}: could not take {self.path} in {ATTEMPTS} attempts (unreadable, or other processes keep "
            "taking it); if no sdtune process uses this folder, delete that file"
        )

    def _write(self, fd: int) -> None:
        pid = self.pid = os.getpid()
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        holder = {"pid": pid, "hostname": socket.gethostname(), "command": shlex.join(sys.argv), "started": started,
                  "process_start": _start_ticks(pid)}  # fmt: skip
        text = json.dumps(holder, indent=1) + "\n"
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        except OSError as err:
            self.path.unlink(missing_ok=True)
            self._remove_created()
            raise SdtuneError(f"{self._name()}: cannot write {self.path} ({err})") from err
        self.text = text

    def _meet_holder(self) -> None:
        """The lock exists: refuse, take it over if stale, or return to try again (released, or still being written)."""
        try:
            text = self.path.read_text()
            holder = json.loads(text)
            int(holder["pid"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.1)  # its holder may be writing it
            return
        if _stale(holder):
            self._take_over(text)
            print(f"warning: {self.path} was left by {_describe(holder)}, which is no longer running; taking it over",
                  file=sys.stderr)  # fmt: skip
            return
        if holder.get("hostname") != socket.gethostname():
            raise SdtuneError(
                f"{self._name()} is locked by {_describe(holder)}, which cannot be checked from this host; if that run "
                f"has ended, delete {self.path} and run again"
            )
        move = f", or set another {self.setting}" if self.setting else ""
        raise SdtuneError(
            f"{self._name()} is in use by another sdtune process ({_describe(holder)}); two processes would overwrite "
            f"each other's files: wait for it to end or stop it (kill {holder['pid']}){move}"
        )

    def _take_over(self, stale_text: str) -> None:
        """Remove the stale lock, and only it: renamed aside first, so a lock another process has just created in
        its place is put back, not deleted."""
        aside = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != stale_text:
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the lock if this process holds it (a forked child inherits the object, not the lock)."""
        if self.text is None or os.getpid() != self.pid:
            return
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except OSError:
            pass
        self.text = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                return
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
