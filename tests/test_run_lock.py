"""One process at a time per run directory and cache folder: a second `fit`, `validate` or `prep cache` refuses in
one line and writes nothing; a lock its holder left behind when it died is taken over; the lock is gone however the
run ends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.runlock import LOCK_NAME, RunLock, is_launching_process

TESTS = Path(__file__).parent


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
              "started": "2025-01-02T03:04:05+00:00"}  # fmt: skip
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
    holder = json.loads(write_lock(tmp_path, live_pid))
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


# --- through the CLI ------------------------------------------------------------------------------------------


def sdtune(*args, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([extra_path, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


def fit_args(tiny_model_dir, shapes_dir, run: Path, command: str = "fit") -> list:
    return [command, "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
            "--data.resolution", 32, "--data.batch_size", 2, "--trainer.max_steps", 2, "--samples.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", run]  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdtune: error:")]


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_second_process_on_a_run_directory_refuses_and_writes_nothing(command, tiny_model_dir, shapes_dir, tmp_path,
                                                                        live_pid):
    run = tmp_path / "run"
    text = write_lock(run, live_pid)
    result = sdtune(*fit_args(tiny_model_dir, shapes_dir, run, command))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert f"trainer.default_root_dir '{run}' is in use by another sdtune process (pid {live_pid} on host" in line
    assert os.listdir(run) == [LOCK_NAME] and (run / LOCK_NAME).read_text() == text


def test_a_stale_lock_is_taken_over_and_every_way_out_releases_it(tiny_model_dir, shapes_dir, tmp_path, dead_pid):
    run = tmp_path / "run"
    write_lock(run, dead_pid)
    done = sdtune(*fit_args(tiny_model_dir, shapes_dir, run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: {run / LOCK_NAME} was left by pid {dead_pid}" in done.stderr
    assert (run / "adapter").is_dir() and not (run / LOCK_NAME).exists()

    # SIGTERM after the first step: saved, stopped with 128 + 15, and the lock released on the way out
    stopped = sdtune(*fit_args(tiny_model_dir, shapes_dir, tmp_path / "stopped"), "--trainer.callbacks+",
                     "step_hooks.StepHooks", "--trainer.callbacks.signal_after", 1, extra_path=str(TESTS))  # fmt: skip
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "SIGTERM: stopped after optimizer step 1 and saved" in stopped.stderr
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()


def test_prep_cache_refuses_while_another_writes_the_cache_and_releases_its_own(tiny_model_dir, shapes_dir, tmp_path,
                                                                              live_pid, capsys):
    dst = Path(shutil.copytree(shapes_dir, tmp_path / "shapes"))
    text = write_lock(dst / "cache", live_pid)
    code = main(["prep", "cache", str(dst), "--model", str(tiny_model_dir), "--resolution", "32"])
    [line] = error_lines(capsys.readouterr().err)
    assert code == 2 and f"'{dst / 'cache'}' is in use by another sdtune process (pid {live_pid}" in line
    assert os.listdir(dst / "cache") == [LOCK_NAME] and (dst / "cache" / LOCK_NAME).read_text() == text
    (dst / "cache" / LOCK_NAME).unlink()  # that process ended and released it
    assert main(["prep", "cache", str(dst), "--model", str(tiny_model_dir), "--resolution", "32"]) == 0
    assert not (dst / "cache" / LOCK_NAME).exists()
