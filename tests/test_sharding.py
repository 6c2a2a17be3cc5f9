"""Teacher steps (toy2d:tiny, MLP) on 8 simulated CPU devices (mesh data=2 x fsdp=4) against the same steps on
one device, and the parameter layout under FSDP. The work runs in tests/sharding_check.py (a subprocess: the
device count must be fixed before jax is imported); see the `sharding_results` fixture in conftest.py.

Tolerance: both runs start from bit-identical states and see the same batches; only the order of float32
reductions differs (per-device partial sums of the loss and gradients, then an all-reduce). That perturbs the
loss and gradients at the 1e-7 relative level; Adam divides by sqrt(v) so a weight moves by at most ~lr per
step whatever the gradient's scale, and the perturbation of each step is a tiny fraction of that. Measured:
parameters differ by 1.3e-7 after 3 steps that moved them by 6e-3 (2e-5 of the update; 1.6e-6 of 3e-3 with the
tiny DiT). We allow 1% of the update size (6e-5): a real error (a missing all-reduce, a gradient averaged over
the wrong axis, a batch shard used twice) changes the update by O(1) of itself.
"""

import numpy as np


def test_eight_device_step_matches_one_device(sharding_results):
    r = sharding_results
    assert r["devices"] == 8 and r["mesh_shape"] == {"data": 2, "fsdp": 4}
    assert r["final_step"] == 3
    assert all(v == 0.0 for v in r["init_diffs"].values()), r["init_diffs"]  # same start
    update = r["update_size"]
    assert 0.5 * 3 * r["lr"] < update < 2 * 3 * r["lr"]  # three real Adam steps of size ~lr
    tolerance = 0.01 * update
    d = r["final_diffs"]
    assert d["step"] == 0 and d["consecutive_skips"] == 0 and d["total_skips"] == 0
    assert d["params"] < tolerance and d["ema_params"] < tolerance, (d, tolerance)
    assert d["opt_state"] < 1e-6, d  # Adam moments: relative 1e-7 of moments of size <~10 (measured 4e-9)
    for name, diff in r["metric_diffs"].items():
        scale = max(abs(m[name]) for m in r["metrics_one"])
        assert diff <= 1e-5 * max(scale, 1.0), (name, diff, scale)
    assert all(m["skipped"] == 0.0 for m in r["metrics_one"])


def test_parameters_are_sharded_under_fsdp(sharding_results):
    params = sharding_results["params_fsdp"]
    for name, info in params.items():
        assert info["num_shards"] == 8 and info["num_devices"] == 8
        shape = info["shape"]
        if name.endswith(("kernel", "embedding")):
            # The rule 'fsdp' splits the largest dimension that divides by 4 over the fsdp axis: 4 distinct
            # blocks, each held by the 2 devices of the data axis.
            axis = info["spec"].index("fsdp")
            divisible = [s for s in shape if s % 4 == 0]
            assert shape[axis] == max(divisible), (name, info)
            expected = list(shape)
            expected[axis] //= 4
            assert info["shard_shapes"] == [expected], (name, info)
            assert info["distinct_blocks"] == 4
        else:  # biases: replicated
            assert info["spec"] == [] and info["shard_shapes"] == [shape] and info["distinct_blocks"] == 1
    # The kernels of the MLP (width 64), explicitly: a tie between equal dimensions goes to the last one.
    assert params["hidden_0/kernel"]["spec"] == [None, "fsdp"]
    assert params["hidden_0/kernel"]["shard_shapes"] == [[64, 16]]
    assert params["input/kernel"]["shard_shapes"] == [[2, 16]]
    assert params["output/kernel"]["spec"] == ["fsdp", None] and params["output/kernel"]["shard_shapes"] == [[16, 2]]
    assert params["y_embedder/embedding"]["shard_shapes"] == [[9, 16]]
    # Per device, the sharded kernels hold a quarter of their weights.
    total = sum(np.prod(i["shape"]) for i in params.values())
    per_device = sum(np.prod(i["shard_shapes"][0]) for i in params.values())
    assert per_device < 0.35 * total
    # On one device nothing is split.
    assert all(i["spec"] == [] or set(i["spec"]) == {None} for i in sharding_results["params_one"].values())


def test_adam_moments_follow_the_parameter_layout(sharding_results):
    opt = sharding_results["opt_state_fsdp"]
    params = sharding_results["params_fsdp"]
    moments = {name: info for name, info in opt.items() if "/mu/" in name or "/nu/" in name}
    assert len(moments) >= 2 * len([n for n in params if not n.startswith("h_embedder")])
    for name, info in moments.items():
        param = params[name.split("/mu/")[-1] if "/mu/" in name else name.split("/nu/")[-1]]
        assert info["spec"] == param["spec"] and info["shard_shapes"] == param["shard_shapes"], (name, info, param)
