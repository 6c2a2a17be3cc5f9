"""Checkpoints: round trip of every item, restore onto another mesh, and the run life cycle (killed, preempted
with SIGTERM, resumed, rerun when finished) against an uninterrupted run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import chex
import jax
import numpy as np
import pytest
from conftest import (REPO, TOY_RUN, complete_checkpoints, load_checkpoint, load_config, main_command,
                      subprocess_env, toy_overrides, tree_snapshot)

from hd.checkpoint import Checkpointer
from hd.train.stages import build_stage
from hd.train.state import TrainState


def _random_like(abstract, seed):
    """Concrete values for every leaf of an abstract tree: distinct random floats, random integers."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            return jax.numpy.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
        return jax.numpy.asarray(rng.integers(1, 1000, leaf.shape), leaf.dtype)

    return jax.tree.map(fill, abstract)


def test_round_trip_of_every_item(tmp_path):
    """params, EMA, the optimizer state (multi_transform of clipping + AdamW: moments and counts), the counters
    and the data-iterator state come back equal, with the same tree structure and types; older steps are
    pruned."""
    config = load_config("toy2d", "tiny")
    stage = build_stage(config, (2,))
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(0))
    states = {step: _random_like(abstract, step) for step in (3, 6, 9)}
    data_states = {step: {"step": step, "seed": 0, "global_batch_size": 64} for step in states}

    checkpointer = Checkpointer(str(tmp_path), keep=2)
    for step, state in states.items():
        checkpointer.save(step, state, data_states[step])
    checkpointer.wait()
    assert checkpointer.latest_step() == 9
    restored, data_state = checkpointer.restore(abstract)
    restored_6, data_state_6 = checkpointer.restore(abstract, step=6)
    checkpointer.close()

    assert complete_checkpoints(tmp_path) == [6, 9]  # keep=2
    assert isinstance(restored, TrainState)
    assert jax.tree.structure(restored) == jax.tree.structure(states[9])
    chex.assert_trees_all_equal(restored, states[9])
    chex.assert_trees_all_equal(restored_6, states[6])
    assert data_state == data_states[9] and data_state_6 == data_states[6]
    # The counters are part of the round trip (the random fill makes them non-zero and distinct).
    assert int(restored.step) == int(states[9].step) != int(states[6].step)
    assert int(restored.total_skips) == int(states[9].total_skips)
    # The optimizer state is really in there: Adam's first moment of some kernel.
    mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored.opt_state)[0]
          if "mu" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    assert mu and all(np.any(np.asarray(m)) for m in mu)


def test_restore_onto_another_mesh(sharding_results):
    """Saved from a 1-device state and restored onto data=2 x fsdp=4 shardings, and the reverse (in the
    8-device subprocess): values equal, shardings those that were asked for."""
    for direction, devices, sharded in (("one_to_fsdp", [8], True), ("fsdp_to_one", [1], False)):
        result = sharding_results["checkpoint"][direction]
        assert all(v == 0.0 for v in result["diffs"].values()), (direction, result["diffs"])
        assert result["specs_match"], direction
        assert result["device_counts"] == devices
        assert (result["num_sharded_params"] > 0) == sharded
        assert result["data_state"] == {"step": 3, "seed": 0, "global_batch_size": 64}
    kernel = sharding_results["checkpoint"]["one_to_fsdp"]["params"]["hidden_0/kernel"]
    assert kernel["spec"] == [None, "fsdp"] and kernel["shard_shapes"] == [[64, 16]]
    assert sharding_results["checkpoint"]["fsdp_to_one"]["params"]["hidden_0/kernel"]["shard_shapes"] == [[64, 64]]


def _wait_for(condition, proc, log_path, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before the condition held:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.01)


def _start(workdir, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(main_command("toy2d.py:tiny", workdir, *toy_overrides()), cwd=REPO,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log)


def test_killed_then_preempted_run_resumes_to_the_uninterrupted_result(toy_run, tmp_path):
    """SIGKILL right after the first complete checkpoint; a second process resumes from it and gets SIGTERM
    once it has written a newer one (exit 143, checkpoint at the step where it stopped); the rest runs
    in-process. The final state (params, EMA, optimizer state, counters) equals an uninterrupted run's,
    bit for bit: nothing is lost or shifted by a step across two interruptions."""
    from hd.train.loop import train

    config = load_config("toy2d", "tiny", TOY_RUN)
    workdir = tmp_path / "work"
    num_steps = TOY_RUN["num_steps"]

    log1 = tmp_path / "run1.log"
    proc = _start(workdir, log1)
    _wait_for(lambda: complete_checkpoints(workdir), proc, log1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed = complete_checkpoints(workdir)
    # Room left for the second process to write a newer checkpoint and still be running when SIGTERM comes.
    assert killed and max(killed) <= num_steps - 2 * TOY_RUN["checkpoint_every"], killed

    log2 = tmp_path / "run2.log"
    proc = _start(workdir, log2)
    _wait_for(lambda: max(complete_checkpoints(workdir)) > max(killed), proc, log2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log2.read_text()[-4000:]
    log = log2.read_text()
    assert f"resumed teacher from step {max(killed)}" in log
    stopped = int(re.search(r"SIGTERM: saved checkpoint at step (\d+)", log).group(1))
    assert max(killed) < stopped < num_steps
    assert max(complete_checkpoints(workdir)) == stopped
    state, data_state = load_checkpoint(workdir, config)
    assert int(state.step) == stopped and data_state["step"] == stopped
    assert json.loads((workdir / "checkpoints" / str(stopped) / "data" / "metadata").read_text())["step"] == stopped

    train(config, str(workdir))
    resumed, resumed_data = load_checkpoint(workdir, config)
    reference, reference_data = load_checkpoint(toy_run[0], config)
    assert int(resumed.step) == num_steps and resumed_data == reference_data
    chex.assert_trees_all_equal(resumed, reference)


def test_rerun_of_finished_run_does_no_training(toy_run, tmp_path):
    from hd.train.loop import train

    workdir = tmp_path / "work"
    shutil.copytree(toy_run[0], workdir)
    config = load_config("toy2d", "tiny", TOY_RUN)
    before = tree_snapshot(workdir / "checkpoints")
    samples_before = tree_snapshot(workdir / "samples")
    assert toy_run[1], "the reference run reported metrics"
    metrics = train(config, str(workdir))
    assert metrics == {}  # no step ran, so nothing was logged
    assert tree_snapshot(workdir / "checkpoints") == before  # no checkpoint written or pruned
    assert tree_snapshot(workdir / "samples") == samples_before
    state, data_state = load_checkpoint(workdir, config)
    assert int(state.step) == TOY_RUN["num_steps"] and data_state["step"] == TOY_RUN["num_steps"]
