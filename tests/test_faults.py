"""Faults a demanding user meets, each reproduced and held to its fixed behaviour: two writers on one work
directory, divergence, hand-off provenance, corrupt checkpoints, a changed config on resume, read-only storage
and a full disk. Runs are toy2d:tiny (the TOY_RUN step, compiled once per session) and shared between
assertions; the mount tests need root and skip with the reason when mounting is not permitted."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import (REPO, TOY_RUN, complete_checkpoints, load_checkpoint, load_config, main_command,
                      subprocess_env, toy_overrides, tree_snapshot)


@pytest.fixture
def logs(caplog):
    """Every log record of the run (absl logs through the standard logging module)."""
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="module")
def reference_20(tmp_path_factory):
    """An uninterrupted 20-step toy run: what a run interrupted and resumed along the way must equal."""
    from hd.train.loop import train

    workdir = tmp_path_factory.mktemp("reference") / "work"
    config = load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=20, checkpoint_every=10))
    train(config, str(workdir))
    return load_checkpoint(workdir, config)


def _copy_run(toy_run, tmp_path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(toy_run[0], workdir)
    return workdir


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs mount (4 MB); skips when this machine does not let the tests mount."""
    mount = tmp_path / "mnt"
    mount.mkdir()

    def mount_with(options: str) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
        return mount

    yield mount_with
    # Lazy: orbax's and TensorStore's threads may still hold a file open for a moment.
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# 1. One writer per work directory -----------------------------------------------------------------------------

def test_second_writer_fails_at_once_and_a_killed_writers_lock_is_taken_over(tmp_path, logs):
    """A run in another process holds the work directory: a second start fails before compiling, naming it
    (pid@host). After kill -9 of the first, the next start takes the stale lock over (logged) and resumes."""
    from hd.checkpoint import LOCK_FILE, WorkdirInUse
    from hd.train.loop import train

    workdir = tmp_path / "work"
    values = dict(TOY_RUN, num_steps=100000)  # runs until killed
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(main_command("toy2d.py:tiny", workdir, *toy_overrides(values)), cwd=REPO,
                                 env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not complete_checkpoints(workdir):
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        owner = json.loads((workdir / LOCK_FILE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()

        start = time.monotonic()
        with pytest.raises(WorkdirInUse, match=f"in use by pid {first.pid}@{socket.gethostname()}"):
            train(load_config("toy2d", "tiny", values), str(workdir))
        assert time.monotonic() - start < 5  # before anything compiles
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert (workdir / LOCK_FILE).exists()  # kill -9 left it behind

    reached = max(complete_checkpoints(workdir))
    logs.clear()
    train(load_config("toy2d", "tiny", dict(values, num_steps=reached + 5)), str(workdir))
    assert f"taking over the stale lock {workdir / LOCK_FILE} of pid {first.pid}@{socket.gethostname()}" in logs.text
    assert f"resumed teacher from step {reached}" in logs.text
    assert max(complete_checkpoints(workdir)) == reached + 5
    assert not (workdir / LOCK_FILE).exists()  # released at the end


# 2. Divergence --------------------------------------------------------------------------------------------

def test_divergence_keeps_the_last_good_checkpoint_and_restore_step_goes_back(tmp_path, logs, reference_20):
    """lr=1e30 from step 10 on: the update of step 11 is finite but makes the weights ~1e30, every later one is
    non-finite. Step 11 is saved (checkpoint_every=1), nothing after it; with keep_checkpoints=1 step 10 would
    be pruned, but it is pinned (the updates after it were not all confirmed finite by a later save). The error
    gives the exact command back to step 10; that command moves step 11 aside and trains to the same state as
    a run that never diverged."""
    from hd.train.loop import NonFiniteError, train

    workdir = tmp_path / "work"
    good = dict(TOY_RUN, num_steps=10, checkpoint_every=5)
    train(load_config("toy2d", "tiny", good), str(workdir))
    assert complete_checkpoints(workdir) == [5, 10]

    bad = dict(good, num_steps=30, checkpoint_every=1, keep_checkpoints=1, max_consecutive_skips=3, log_every=5,
               **{"optimizer.lr": 1e30})
    with pytest.raises(NonFiniteError) as error:
        train(load_config("toy2d", "tiny", bad), str(workdir))
    message = str(error.value)
    assert message.startswith("step 15: 4 non-finite updates in a row (limit config.max_consecutive_skips=3)")
    assert "checkpoints on disk: steps [10, 11]" in message
    command = message.split("resume from step 10", 1)[1].split(": ", 1)[1]
    assert command.startswith("python -m hd.main --config=CONFIG_FILE:VARIANT")  # in-process: no command line
    assert command.endswith(f"--workdir={workdir} --config.restore_step=10 --config.optimizer.lr=1e+29")
    assert "step 12: no checkpoint written, the last 1 updates were non-finite" in logs.text
    assert complete_checkpoints(workdir) == [10, 11]  # 10 pinned despite keep_checkpoints=1

    logs.clear()
    resumed = dict(good, num_steps=20, restore_step=10)
    train(load_config("toy2d", "tiny", resumed), str(workdir))
    abandoned = list(workdir.glob("checkpoints_abandoned_*"))
    assert len(abandoned) == 1 and sorted(p.name for p in abandoned[0].iterdir()) == ["11"]
    assert f"config.restore_step=10: moved the newer checkpoint steps [11] to {abandoned[0]}" in logs.text
    state, data_state = load_checkpoint(workdir, load_config("toy2d", "tiny", resumed))
    chex.assert_trees_all_equal((state, data_state), reference_20)

    history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in history] == [0, 10, 10]
    assert history[1]["changes"]["optimizer.lr"] == [0.002, 1e30]
    assert history[2]["restored_from"] == 10 and history[2]["abandoned"]["steps"] == [11]
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 0.002


# 4. Hand-off provenance ---------------------------------------------------------------------------------------

def _edit_config_json(workdir: Path, **changes) -> None:
    path = workdir / "config.json"
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def test_hand_off_checks_and_records_its_sources(toy_run, tmp_path, logs):
    from hd.train.loop import train
    from hd.train.stages import hand_off_sources

    teacher = str(toy_run[0])
    steps = TOY_RUN["num_steps"]
    sketch_values = {"sketch.teacher_workdir": teacher, "num_steps": 2, "log_every": 1, "checkpoint_every": 2}
    sketch = tmp_path / "sketch"
    train(load_config("toy2d", "sketch_tiny", sketch_values), str(sketch))
    expected = {"teacher": {"workdir": teacher, "stage": "teacher", "step": steps, "num_steps": steps}}
    assert json.loads((sketch / "config.json").read_text())["sources"] == expected
    assert json.loads((sketch / "config_history.jsonl").read_text())["sources"] == expected
    assert f"hand-off: teacher = ema_params of {teacher} (stage teacher, step {steps} of {steps})" in logs.text
    assert "could not be restored" not in logs.text  # reads only the item it asks for (no orbax warning)

    def sources(**overrides):
        return hand_off_sources(load_config("toy2d", "sketch_tiny", dict(sketch_values, **overrides)))

    # An unfinished teacher is an error unless allowed (then logged and recorded as such).
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher, unfinished)
    _edit_config_json(unfinished, num_steps=3000)
    with pytest.raises(ValueError, match=f"is unfinished: its newest checkpoint is step {steps} of its "
                                         r"num_steps=3000.*--config.allow_unfinished_sources=True"):
        sources(**{"sketch.teacher_workdir": str(unfinished)})
    allowed = sources(**{"sketch.teacher_workdir": str(unfinished), "allow_unfinished_sources": True})
    assert allowed["teacher"]["step"] == steps and allowed["teacher"]["num_steps"] == 3000
    # An imported teacher (the importer's config.json says `imported_from`) counts as finished.
    _edit_config_json(unfinished, imported_from="DiT-XL-2-256x256.pt")
    assert sources(**{"sketch.teacher_workdir": str(unfinished)})["teacher"]["num_steps"] == steps
    # A directory of the wrong stage names both stages; so does a teacher given as the refine stage's sketch.
    with pytest.raises(ValueError, match="holds a 'sketch' stage .* but the teacher must be a 'teacher' stage"):
        sources(**{"sketch.teacher_workdir": str(sketch)})
    refine = load_config("toy2d", "refine_tiny", {"refine.teacher_workdir": teacher,
                                                  "refine.sketch_workdir": teacher})
    with pytest.raises(ValueError, match="holds a 'teacher' stage .* but the sketch must be a 'sketch' stage"):
        hand_off_sources(refine)
    # No config.json: named. And the training loop stops on it before writing anything.
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(FileNotFoundError, match=f"{bare / 'config.json'} is missing"):
        train(load_config("toy2d", "sketch_tiny", dict(sketch_values, **{"sketch.teacher_workdir": str(bare)})),
              str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# 5. Corrupt checkpoints -----------------------------------------------------------------------------------

def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(toy_run, tmp_path, logs):
    """An array file of step 150 cut in half: the resume warns naming step 150, item and array, moves the step
    aside untouched, resumes from 125 and retrains step 150 bit for bit."""
    from hd.train.loop import train

    workdir = _copy_run(toy_run, tmp_path)
    damaged = _largest_file(workdir / "checkpoints" / "150" / "params")
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    config = load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=160))
    train(config, str(workdir))
    assert "checkpoint step 150 in" in logs.text and "item 'params', array '" in logs.text
    assert "resumed teacher from step 125" in logs.text
    moved = list(workdir.glob("checkpoints_unreadable_*"))
    assert len(moved) == 1
    kept = moved[0] / "150" / damaged.relative_to(workdir / "checkpoints" / "150")
    assert kept.stat().st_size == size // 2  # never deleted, left as it was
    assert complete_checkpoints(workdir) == [125, 150, 160]
    chex.assert_trees_all_equal(load_checkpoint(workdir, config, step=150), load_checkpoint(toy_run[0], config))


def test_unreadable_checkpoints_are_named_by_step_item_and_file(toy_run, tmp_path, logs):
    """Deleted item directory, deleted array file, truncated array file: the resume tries each step, and when
    none restores the error names every step with its item (and file); a hand-off read names step and item."""
    from hd.checkpoint import Checkpointer, CheckpointUnreadable, read_items
    from hd.train.stages import build_stage

    workdir = _copy_run(toy_run, tmp_path)
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "150" / "opt_state")
    _largest_file(checkpoints / "125" / "params").unlink()
    damaged = _largest_file(checkpoints / "100" / "ema_params")
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 2)

    config = load_config("toy2d", "tiny", TOY_RUN)
    abstract = jax.eval_shape(build_stage(config, (2,)).init_state, jax.random.PRNGKey(0))
    checkpointer = Checkpointer(str(workdir), keep=3)
    try:
        with pytest.raises(CheckpointUnreadable) as error:
            checkpointer.restore_newest(abstract, checkpointer.all_steps())
    finally:
        checkpointer.close()
    message = str(error.value)
    assert f"step 150: item(s) ['opt_state'] missing (no {checkpoints / '150' / 'opt_state'})" in message
    assert f"step 125: item 'params', array '" in message and f"under {checkpoints / '125'}" in message
    assert f"step 100: item 'ema_params', array '" in message
    assert complete_checkpoints(workdir) == [100, 125, 150]  # nothing deleted

    logs.clear()
    with pytest.raises(CheckpointUnreadable, match=f"checkpoint {checkpoints}/100: item 'ema_params', array '"):
        read_items(str(workdir), {"ema_params": abstract.ema_params}, step=100)
    items, step = read_items(str(workdir), {"params": abstract.params}, step=150)
    assert step == 150 and jax.tree.structure(items["params"]) == jax.tree.structure(abstract.params)
    assert "could not be restored" not in logs.text


# 6. Resume with a changed config ------------------------------------------------------------------------------

def test_resume_with_a_changed_config(toy_run, tmp_path, logs, monkeypatch):
    from hd.train import loop

    workdir = _copy_run(toy_run, tmp_path)
    before = tree_snapshot(workdir)
    real_compile = loop.compile_train_step

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the config was compared")

    monkeypatch.setattr(loop, "compile_train_step", no_compile)
    changed = dict(TOY_RUN, **{"model.width": 32, "batch_size": 32, "seed": 1, "optimizer.lr": 1e-3})
    with pytest.raises(ValueError) as error:
        loop.train(load_config("toy2d", "tiny", changed), str(workdir))
    message = str(error.value)
    assert "batch_size: 64 -> 32; model.width: 64 -> 32; seed: 0 -> 1." in message
    assert "optimizer.lr" not in message  # may change on resume
    # num_steps at or below the step reached: says so, trains and writes nothing.
    assert loop.train(load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=100)), str(workdir)) == {}
    assert "config.num_steps=100 but" in logs.text and "is already at step 150: nothing to train" in logs.text
    assert tree_snapshot(workdir) == before

    monkeypatch.setattr(loop, "compile_train_step", real_compile)
    logs.clear()
    metrics = loop.train(load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=160, **{"optimizer.lr": 1e-3})),
                         str(workdir))
    assert np.isfinite(metrics["loss"])
    assert "settings changed on resume (kept in config_history.jsonl): num_steps: 150 -> 160; optimizer.lr: " \
           "0.002 -> 0.001" in logs.text
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["optimizer"]["lr"] == 0.001 and stored["num_steps"] == 160
    history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["num_steps"]) for r in history] == [(0, 150), (150, 160)]
    assert history[0]["changes"] == {}
    assert history[1]["changes"] == {"num_steps": [150, 160], "optimizer.lr": [0.002, 0.001]}


# 7. Read-only storage -----------------------------------------------------------------------------------------

def test_finished_run_on_read_only_storage_is_a_no_op(toy_run, tmpfs, logs):
    from hd.train.loop import train

    mount = tmpfs("size=8m")
    workdir = mount / "work"
    shutil.copytree(toy_run[0], workdir)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    with pytest.raises(OSError, match="Read-only file system"):
        (workdir / "probe").write_text("")  # the mount really is read-only, for root too
    before = tree_snapshot(workdir)
    # Also with a setting that may change on resume: nothing trains, so nothing is recorded.
    for values in (TOY_RUN, dict(TOY_RUN, **{"optimizer.lr": 1e-3})):
        assert train(load_config("toy2d", "tiny", values), str(workdir)) == {}
    assert f"teacher in {workdir} is finished: step 150 of num_steps=150 (checkpoint steps [100, 125, 150]); " \
           "nothing to do" in logs.text
    assert tree_snapshot(workdir) == before


# 9. Disk full during a save -------------------------------------------------------------------------------

def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resumes(tmpfs, logs, reference_20):
    from hd.checkpoint import DiskFullError
    from hd.train.loop import train

    mount = tmpfs("size=4m")
    workdir = mount / "work"
    config = load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=20, checkpoint_every=10))
    train(load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=10, checkpoint_every=10)), str(workdir))
    saved = load_checkpoint(workdir, config)
    # Fill the disk, then free 64 KiB: enough for the lock and config files, not for a checkpoint (~600 KiB).
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\1" * 65536)
    except OSError as e:
        assert e.errno == 28
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 65536)

    with pytest.raises(DiskFullError, match=f"no disk space left under {workdir} while writing checkpoint step "
                                            r"20 .*checkpoint step 10 is intact and the run resumes from it"):
        train(config, str(workdir))
    assert complete_checkpoints(workdir) == [10]
    chex.assert_trees_all_equal(load_checkpoint(workdir, config), saved)

    filler.unlink()
    logs.clear()
    train(config, str(workdir))
    assert "resumed teacher from step 10" in logs.text
    assert complete_checkpoints(workdir) == [10, 20]
    chex.assert_trees_all_equal(load_checkpoint(workdir, config), reference_20)
