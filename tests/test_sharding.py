"""Every training stage (toy2d MLPs: teacher, sketch, refine) on 8 simulated CPU devices (mesh data=2 x fsdp=4)
against the same steps on one device, and the layout of every network under FSDP: the trained parameters,
their EMA and Adam moments, refine's critic (fake score and GAN head) and its moments, and the frozen teacher
that the sketch and refine steps read. The work runs in tests/sharding_check.py (a subprocess: the device count
must be fixed before jax is imported); see the `sharding_results` fixture in conftest.py.

Tolerance: both runs start from bit-identical states and see the same batches; only the order of float32
reductions differs (per-device partial sums of the losses and gradients, then an all-reduce). That perturbs the
losses and gradients at the 1e-7 relative level; Adam divides by sqrt(v), so a weight moves by at most ~lr per
step whatever the gradient's scale, and the perturbation of each step is a tiny fraction of that. Measured
after 3 steps (difference / update): teacher parameters 6e-8 / 6e-3, sketch 3e-8 / 3e-3, refine generator
5e-8 / 2e-4 (two generator updates at lr 1e-4) and critic 1e-6 / 3e-3 (three updates at lr 1e-3; the DMD and
GAN terms chain more reductions). We allow 1% of each tree's update: a real error (a missing all-reduce, a
gradient averaged over the wrong axis, a batch shard used twice, a frozen tree read from the wrong shard)
changes the update by O(1) of itself. Metrics: 1e-5 relative (measured <= 4e-7), except accuracies, which
count examples and may flip one example whose logit sits at 0.
"""

import numpy as np
import pytest

STAGES = ("teacher", "sketch", "refine")
# Trained trees per stage and the tree whose paths each optimizer state mirrors.
TRAINED = {"teacher": {"params": None, "ema_params": None, "opt_state": "params"},
           "sketch": {"params": None, "ema_params": None, "opt_state": "params"},
           "refine": {"params": None, "ema_params": None, "opt_state": "params", "critic_params": None,
                      "critic_opt_state": "critic_params"}}
BATCH = 64  # toy2d tiny variants


@pytest.fixture(params=STAGES)
def stage(request, sharding_results):
    return request.param, sharding_results["stages"][request.param]


def test_eight_device_step_matches_one_device(stage, sharding_results):
    name, r = stage
    assert sharding_results["devices"] == 8 and sharding_results["mesh_shape"] == {"data": 2, "fsdp": 4}
    assert r["final_step"] == 3
    assert all(v == 0.0 for v in r["init_diffs"].values()), r["init_diffs"]  # same start
    d = r["final_diffs"]
    assert set(d) >= set(TRAINED[name]), d
    assert d["step"] == 0 and d["consecutive_skips"] == 0 and d["total_skips"] == 0
    updates = r["update_sizes"]
    # Real Adam steps of size ~lr: three per tree, but refine's generator updates every 2nd step (steps 0, 2).
    expected = {"params": 3 * r["lr"], "critic_params": 3 * r["critic_lr"]}
    if name == "refine":
        expected["params"] = 2 * r["lr"]
        assert r["generator_every"] == 2
    for tree, size in expected.items():
        if tree in updates:
            assert 0.5 * size < updates[tree] < 2 * size, (name, tree, updates[tree], size)
    for tree in ("params", "ema_params", "critic_params"):
        if tree in d:
            tolerance = 0.01 * updates[tree]
            assert d[tree] < tolerance, (name, tree, d[tree], tolerance)
    for tree in ("opt_state", "critic_opt_state"):
        if tree in d:  # Adam moments: relative 1e-7 of moments of size <~10 (measured <= 1e-8)
            assert d[tree] < 1e-6, (name, tree, d[tree])
    for metric, diff in r["metric_diffs"].items():
        scale = max(abs(m[metric]) for m in r["metrics_one"])
        allowed = 1.0 / BATCH if "acc" in metric else 1e-5 * max(scale, 1.0)
        assert diff <= allowed, (name, metric, diff, scale)
    assert all(m["skipped"] == 0.0 for m in r["metrics_one"])


def _check_fsdp_layout(tree: dict, where: str) -> None:
    """Kernels and embeddings with a dimension divisible by fsdp=4: that dimension (the largest such, ties to the
    last) split over the fsdp axis, 4 distinct blocks each held by the 2 devices of the data axis. Everything
    else (biases, norms, counters, AWD's 1 x 64 query) replicated."""
    assert tree, where
    for name, info in tree.items():
        assert info["num_shards"] == 8 and info["num_devices"] == 8, (where, name, info)
        shape = info["shape"]
        divisible = [s for s in shape if s % 4 == 0]
        if name.endswith(("kernel", "embedding")) and divisible:
            assert "fsdp" in info["spec"], (where, name, info)
            axis = info["spec"].index("fsdp")
            assert shape[axis] == max(divisible), (where, name, info)
            expected = list(shape)
            expected[axis] //= 4
            assert info["shard_shapes"] == [expected], (where, name, info)
            assert info["distinct_blocks"] == 4, (where, name, info)
        else:
            assert set(info["spec"]) <= {None} and info["shard_shapes"] == [shape], (where, name, info)
            assert info["distinct_blocks"] == 1, (where, name, info)
            assert np.prod(shape) <= 128, (where, name, info)  # only small arrays are left whole
    # Per device, the tree holds little more than a quarter of its weights.
    total = sum(np.prod(i["shape"]) for i in tree.values())
    per_device = sum(np.prod(i["shard_shapes"][0]) for i in tree.values())
    assert per_device < 0.35 * total, (where, per_device, total)


def test_every_network_is_sharded_under_fsdp(stage):
    name, r = stage
    trees = r["trees_fsdp"]
    assert set(trees) == set(TRAINED[name]), sorted(trees)
    for tree_name, tree in trees.items():
        _check_fsdp_layout(tree, f"{name}/{tree_name}")
    if name == "teacher":
        assert r["frozen_fsdp"] is None
    else:  # the frozen teacher the step reads: sharded like the trained trees
        _check_fsdp_layout(r["frozen_fsdp"], f"{name}/frozen teacher")
        assert set(r["frozen_fsdp"]) == set(trees["params"])  # the whole backbone, same paths
    if name == "refine":
        critic = trees["critic_params"]
        for network in ("fake_score", "head"):  # both critic networks are there and split
            kernels = [n for n in critic if n.startswith(network + "/") and n.endswith("kernel")]
            assert kernels and all("fsdp" in critic[n]["spec"] for n in kernels), (network, kernels)
        assert {n.removeprefix("fake_score/") for n in critic if n.startswith("fake_score/")} == set(trees["params"])
    # On one device nothing is split.
    assert all(set(i["spec"]) <= {None} for i in r["params_one"].values())


def test_mlp_kernels_split_on_their_largest_dimension(sharding_results):
    params = sharding_results["stages"]["teacher"]["trees_fsdp"]["params"]
    # The kernels of the MLP (width 64), explicitly: a tie between equal dimensions goes to the last one.
    assert params["hidden_0/kernel"]["spec"] == [None, "fsdp"]
    assert params["hidden_0/kernel"]["shard_shapes"] == [[64, 16]]
    assert params["input/kernel"]["shard_shapes"] == [[2, 16]]
    assert params["output/kernel"]["spec"] == ["fsdp", None] and params["output/kernel"]["shard_shapes"] == [[16, 2]]
    assert params["y_embedder/embedding"]["shard_shapes"] == [[9, 16]]


def test_adam_moments_follow_the_parameter_layout(stage):
    name, r = stage
    trees = r["trees_fsdp"]
    for opt_name, param_name in TRAINED[name].items():
        if param_name is None:
            continue
        params, opt = trees[param_name], trees[opt_name]
        moments = {n: info for n, info in opt.items() if "/mu/" in n or "/nu/" in n}
        # The teacher never trains its h-embedding (no moments for it); every other parameter has mu and nu.
        trained = [n for n in params if not (name == "teacher" and n.startswith("h_embedder"))]
        assert len(moments) == 2 * len(trained), (name, opt_name, len(moments), len(trained))
        for n, info in moments.items():
            param = params[n.split("/mu/")[-1] if "/mu/" in n else n.split("/nu/")[-1]]
            assert info["spec"] == param["spec"] and info["shard_shapes"] == param["shard_shapes"], (n, info, param)
