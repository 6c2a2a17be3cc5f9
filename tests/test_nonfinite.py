"""Non-finite updates are skipped inside the compiled step, and too many in a row stop the run cleanly."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from conftest import TOY_RUN, complete_checkpoints, load_checkpoint, load_config

from hd import parallel
from hd.data import Toy2dSource
from hd.train.stages import build_stage


def _host_copy(tree):
    """A host copy that owns its memory: on CPU, device_get can return views of device buffers, which the
    next (donating) step may overwrite in place."""
    return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_update_is_skipped_in_the_compiled_step(bad):
    from hd.train.loop import compile_train_step

    config = load_config("toy2d", "tiny", TOY_RUN)  # the step the toy run compiles (no warm-up)
    stage = build_stage(config, (2,))
    mesh = parallel.make_mesh(1, 1)
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(0))
    step, state_sharding, _, batch_sharding = compile_train_step(
        stage, mesh, tuple(tuple(r) for r in config.sharding_rules), abstract)
    state = jax.jit(stage.init_state, out_shardings=state_sharding)(jax.random.PRNGKey(0))

    rng = np.random.default_rng(0)
    good = Toy2dSource("8gaussians", 8).sample(rng, config.batch_size)
    poisoned = dict(good, x=good["x"].copy())
    poisoned["x"][3, 1] = bad  # one coordinate of one example

    history, metrics = [_host_copy(state)], []
    for batch in (good, poisoned, poisoned, good):
        state, m = step(state, parallel.global_batch(batch, batch_sharding), None)
        history.append(_host_copy(state))  # the step donates its input
        metrics.append(jax.device_get(m))

    skipped = [float(m["skipped"]) for m in metrics]
    assert skipped == [0.0, 1.0, 1.0, 0.0]
    assert not np.isfinite(metrics[1]["loss"]) and np.isfinite(metrics[0]["loss"])
    assert [int(s.step) for s in history] == [0, 1, 2, 3, 4]  # the step counter advances regardless
    assert [int(s.consecutive_skips) for s in history] == [0, 0, 1, 2, 0]
    assert [int(s.total_skips) for s in history] == [0, 0, 1, 2, 2]
    # A finite update changes the weights, the EMA and the optimizer state.
    for field in ("params", "ema_params", "opt_state"):
        assert _changed(getattr(history[1], field), getattr(history[0], field)), field
    # Skipped updates leave all three exactly as they were.
    for i in (2, 3):
        chex.assert_trees_all_equal(history[i].params, history[1].params)
        chex.assert_trees_all_equal(history[i].ema_params, history[1].ema_params)
        chex.assert_trees_all_equal(history[i].opt_state, history[1].opt_state)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(history[3].params))
    # And training continues from there.
    assert _changed(history[4].params, history[3].params)


class _NanFrom:
    """The real batch iterator, with every batch from number `start` on replaced by NaNs."""

    def __init__(self, inner, start):
        self.inner, self.start, self.source = inner, start, inner.source

    def __iter__(self):
        return self

    def __next__(self):
        index = self.inner.step
        batch = next(self.inner)
        return dict(batch, x=np.full_like(batch["x"], np.nan)) if index >= self.start else batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_consecutive_skips_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch):
    from hd.train import loop

    real = loop.make_batch_iterator
    monkeypatch.setattr(loop, "make_batch_iterator", lambda *a, **k: _NanFrom(real(*a, **k), start=10))
    config = load_config("toy2d", "tiny", dict(TOY_RUN, num_steps=40, checkpoint_every=5, log_every=1,
                                               max_consecutive_skips=3))
    workdir = tmp_path / "work"
    # Batches 10, 11, 12 feed steps 11, 12, 13: the third skip in a row is step 13.
    with pytest.raises(loop.NonFiniteError, match=r"step 13: 3 non-finite updates in a row .*max_consecutive_skips=3"):
        loop.train(config, str(workdir))
    assert complete_checkpoints(workdir) == [5, 10]  # nothing saved after the failure started
    state, data_state = load_checkpoint(workdir, config)
    assert int(state.step) == 10 and data_state["step"] == 10
    assert int(state.total_skips) == 0 and int(state.consecutive_skips) == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state)))
