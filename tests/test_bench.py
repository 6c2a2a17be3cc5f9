"""The benchmark's throughput rows on the toy config: real numbers of the right kind, and the goal logic."""

import jax
import numpy as np

from hd import bench
from tests.conftest import load_config


def test_sampling_rates_compare_one_step_with_the_teacher_sampler():
    config = load_config("toy2d", "sketch_tiny")
    rates = bench.sampling_rates(config, (2,), teacher_steps=8, repeats=2)
    one, teacher = rates["one_step"], rates["teacher_euler8"]
    assert one["nfe"] == 1 and teacher["nfe"] == 8
    for r in (one, teacher):
        assert r["batch_size"] == config.batch_size
        assert r["seconds_per_batch"] > 0
        np.testing.assert_allclose(r["images_per_s"], config.batch_size / r["seconds_per_batch"])
    np.testing.assert_allclose(one["speedup_over_teacher"], one["images_per_s"] / teacher["images_per_s"])


def test_data_rate_times_the_training_input_pipeline():
    config = load_config("toy2d", "sketch_tiny")
    rate = bench.data_rate(config, num_batches=5)
    assert rate["batches_timed"] == 5 and rate["seconds_per_batch"] > 0
    np.testing.assert_allclose(rate["batches_per_s"], 1 / rate["seconds_per_batch"])


def test_ratios_and_goals():
    config = load_config("toy2d", "sketch_tiny")
    results = {"teacher": {"step_s_median": 1.0, "memory_bytes": {"peak": 100}, "flops": 10.0},
               "sketch": {"step_s_median": 3.0, "memory_bytes": {"peak": 150}, "flops": 25.0}}
    r = bench.ratios(results)["sketch/teacher"]
    assert (r["time"], r["peak_memory"], r["flops"]) == (3.0, 1.5, 2.5)
    assert r["time_goal_met"] is False and r["peak_memory_goal_met"] is True
    assert bench.mfu_goal("teacher") == 0.5 and bench.mfu_goal("refine_k5") == 0.4
    assert bench.steps_in("refine_k5", config) == config.refine.generator_every
    assert bench.steps_in("sketch", config) == 1


def test_refine_cycle_counts_the_generator_update_once():
    """XLA counts a lax.cond's costlier branch on every step; the recount takes each branch where it runs."""
    import jax.numpy as jnp

    def step(state, x):
        due = state % 2 == 0
        y = jax.lax.cond(due, lambda v: (v @ v) @ v, lambda v: v, x)
        return state + 1, y @ x

    x = jnp.ones((16, 16))
    args = (jnp.int32(0), x)
    matmul = 2 * 16 ** 3
    assert bench.cost_with_cond_branch(step, args, True)["flops"] >= 3 * matmul
    assert bench.cost_with_cond_branch(step, args, False)["flops"] < 1.5 * matmul
    assert jax.lax.cond is not None and jax.lax.cond.__name__ == "cond"  # restored
