"""The run lock: a second holder refuses in one line and leaves the lock as it was; a lock its holder left behind when
it died is taken over; the lock is gone after its holder ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from sdtune.errors import SdtuneError
from sdtune.runlock import LOCK_NAME, RunLock, _start_ticks, is_launching_process


@pytest.fixture
def live_pid():
    """A process of this host that keeps running during the test."""
    process = subprocess.Popen(["sleep", "300"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(folder: Path, pid: int, hostname: str | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "hostname": hostname or socket.gethostname(), "command": "sdtune fit ...",
              "started": "2025-01-02T03:04:05+00:00", "process_start": _start_ticks(pid)}  # fmt: skip
    text = json.dumps(holder)
    (folder / LOCK_NAME).write_text(text)
    return text


# --- the lock itself ------------------------------------------------------------------------------------------


def test_the_lock_holds_who_took_it_and_is_gone_after(tmp_path):
    run = tmp_path / "runs" / "a"
    with RunLock(run, "trainer.default_root_dir") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["hostname"] == socket.gethostname()
        assert {"command", "started", "process_start"} <= holder.keys()
        with pytest.raises(SdtuneError, match=f"pid {os.getpid()} on host {socket.gethostname()}, started"):
            RunLock(run, "trainer.default_root_dir").acquire()  # held by this very process: refused too
    assert not (run / LOCK_NAME).exists()
    assert not (tmp_path / "runs").exists()  # the folders made for the lock alone are removed again


def test_a_live_holder_is_refused_in_one_line_and_its_lock_kept(tmp_path, live_pid):
    text = write_lock(tmp_path, live_pid)
    with pytest.raises(SdtuneError) as refused:
        RunLock(tmp_path, "trainer.default_root_dir").acquire()
    message = str(refused.value)
    assert "\n" not in message and f"'{tmp_path}' is in use" in message
    assert f"pid {live_pid} on host {socket.gethostname()}, started 2025-01-02T03:04:05" in message
    assert f"kill {live_pid}" in message and "set another trainer.default_root_dir" in message
    assert (tmp_path / LOCK_NAME).read_text() == text


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, dead_pid, capsys):
    write_lock(tmp_path, dead_pid)
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and f"left by pid {dead_pid}" in warning and "taking it over" in warning
    assert os.listdir(tmp_path) == []


def test_a_reused_pid_does_not_hold_the_lock(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    (tmp_path / LOCK_NAME).write_text(json.dumps({**holder, "process_start": "1"}))  # an earlier process, same pid
    with RunLock(tmp_path):
        pass


def test_a_lock_from_another_host_says_how_to_remove_it(tmp_path, dead_pid):
    text = write_lock(tmp_path, dead_pid, hostname="other-host")
    with pytest.raises(SdtuneError, match=f"pid {dead_pid} on host other-host.*cannot be checked from this host.*"
                       f"delete {tmp_path / LOCK_NAME}"):  # fmt: skip
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == text


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path, live_pid):
    lock = RunLock(tmp_path).acquire()
    text = write_lock(tmp_path, live_pid)  # replaced by hand while held
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == text


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"])
def test_ranks_started_by_a_launcher_do_not_take_the_lock(variable, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_launching_process()
    monkeypatch.setenv(variable, "0")
    assert is_launching_process()
    monkeypatch.setenv(variable, "1")
    assert not is_launching_process()
