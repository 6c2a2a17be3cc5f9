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
    assert bench.mfu_goal("teacher") == 0.35 and bench.mfu_goal("refine_k5") == 0.4
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


def test_flops_of_a_scanned_rematerialised_dit_are_the_unrolled_model_flops():
    """XLA counts a scan's body once and counts recomputation: the benchmark counts 1 and 2 unrolled blocks and
    extends to the depth. It must agree with the unrolled program's own count, the refine head's block included."""
    config = load_config("fashion_mnist", "refine_tiny", {"model.size": "mini", "model.patch_size": 7,
                                                           "refine.feature_block": 2, "batch_size": 4})
    shape = (28, 28, 1)
    direct = bench.model_flops(config, shape, bench.train_steps(config, shape, abstract=True,
                                                                stages=("refine",)))
    scanned = load_config("fashion_mnist", "refine_tiny", {"model.size": "mini", "model.patch_size": 7,
                                                            "refine.feature_block": 2, "batch_size": 4,
                                                            "model.scan_blocks": True, "model.remat": True})
    entries = bench.train_steps(scanned, shape, abstract=True, stages=("refine",))
    assert set(entries) == {"teacher", "refine_k2"}
    xla_count = bench.lowered_cost(*entries["teacher"])["flops"]
    extended = bench.model_flops(scanned, shape, entries)
    assert xla_count < 0.6 * direct["teacher"]["flops"]  # the scan's 4 blocks counted as 1 (and remat)
    for name in direct:
        np.testing.assert_allclose(extended[name]["flops"], direct[name]["flops"], rtol=1e-4)
        np.testing.assert_allclose(extended[name]["bytes_accessed"], direct[name]["bytes_accessed"], rtol=1e-3)
    from hd.models.dit import DIT_SIZES

    assert not [name for name in DIT_SIZES if "@" in name]  # the temporary sizes are gone


def test_bench_shapes_and_peak_dtype():
    config = load_config("fashion_mnist", "tiny", {"data.example_shape": (32, 32, 4)})
    assert bench.data_shape(config) == (32, 32, 4)
    assert bench.data_shape(load_config("fashion_mnist", "tiny")) == (28, 28, 1)
    assert bench.matmul_rate(64, "bfloat16", repeats=2) > 0
