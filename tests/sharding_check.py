"""Run by tests/conftest.py (fixture `sharding_results`) with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Builds the toy2d:tiny teacher step (MLP; a DiT step takes far longer to compile on 8 CPU devices) exactly as
hd.train.loop does (build_stage -> compile_train_step), runs the same few steps on a 1-device mesh and on a
data=2 x fsdp=4 mesh, and writes to the JSON file named by argv[1]:
- the largest differences between the two runs (state fields and metrics) and the size of the update,
- the sharding of every parameter and Adam moment on the 8-device mesh (spec, global and per-device shapes),
- checkpoint round trips across meshes: saved from the 1-device state and restored onto the fsdp shardings,
  and the reverse.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (before jax is imported)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hd import parallel  # noqa: E402
from hd.checkpoint import Checkpointer, abstract_like  # noqa: E402
from hd.config import validate  # noqa: E402
from hd.train.loop import compile_train_step  # noqa: E402
from hd.train.stages import build_stage  # noqa: E402

NUM_STEPS = 3
DATA_SHAPE = (2,)


def load_config():
    spec = importlib.util.spec_from_file_location("toy2d_config", os.path.join(REPO, "configs", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.optimizer.warmup_steps = 0  # full learning rate from the first step, so every step moves the weights
    return config


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {parallel.path_name(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0)
               for k in a)


def field_diffs(a, b) -> dict[str, float]:
    return {name: max_abs_diff(flat(getattr(a, name)), flat(getattr(b, name)))
            for name in ("step", "params", "ema_params", "opt_state", "consecutive_skips", "total_skips")}


def describe_shardings(tree) -> dict[str, dict]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "sharding"):
            continue
        shards = leaf.addressable_shards
        out[parallel.path_name(path)] = dict(
            spec=[None if s is None else str(s) for s in leaf.sharding.spec],
            shape=list(leaf.shape),
            shard_shapes=sorted({tuple(s.data.shape) for s in shards}),
            num_shards=len(shards),
            distinct_blocks=len({tuple((i.start, i.stop) for i in s.index) for s in shards}),
            num_devices=len(leaf.sharding.device_set),
        )
    return out


def main(out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = load_config()
    validate(config, jax.device_count())
    stage = build_stage(config, DATA_SHAPE)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    key = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(stage.init_state, key)

    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(0, 2, (config.batch_size, *DATA_SHAPE)).astype(np.float32),
                "y": rng.integers(0, config.data.num_classes, config.batch_size).astype(np.int32)}
               for _ in range(NUM_STEPS)]
    # One initial state for both meshes (compiling the initialiser a second time for 8 devices costs seconds).
    initial = jax.device_get(jax.jit(stage.init_state)(key))

    meshes = {"one": parallel.make_mesh(1, 1, jax.devices()[:1]),
              "fsdp": parallel.make_mesh(config.mesh.data, config.mesh.fsdp)}
    runs = {}
    for name, mesh in meshes.items():
        step, state_sharding, frozen_sharding, batch_sharding = compile_train_step(stage, mesh, rules, abstract_state)
        state = jax.device_put(initial, state_sharding)
        init = jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(state))
        frozen = jax.device_put(stage.frozen, frozen_sharding)
        metrics = []
        for batch in batches:
            state, m = step(state, parallel.global_batch(batch, batch_sharding), frozen)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        runs[name] = dict(init=init, state=state, metrics=metrics, sharding=state_sharding)

    one, fsdp = runs["one"], runs["fsdp"]
    results = dict(
        devices=jax.device_count(),
        mesh_shape=dict(meshes["fsdp"].shape),
        init_diffs=field_diffs(one["init"], fsdp["init"]),
        final_diffs=field_diffs(one["state"], fsdp["state"]),
        metric_diffs={k: max(abs(a[k] - b[k]) for a, b in zip(one["metrics"], fsdp["metrics"]))
                      for k in one["metrics"][0]},
        metrics_one=one["metrics"],
        update_size=max_abs_diff(flat(one["state"].params), flat(one["init"].params)),
        param_max_abs=max(float(np.max(np.abs(v))) for v in flat(one["state"].params).values()),
        final_step=int(fsdp["state"].step),
        lr=config.optimizer.lr,
        params_fsdp=describe_shardings(fsdp["state"].params),
        opt_state_fsdp=describe_shardings(fsdp["state"].opt_state),
        params_one=describe_shardings(one["state"].params),
    )

    # Checkpoints written from one mesh and restored onto the other mesh's shardings.
    data_state = {"step": NUM_STEPS, "seed": config.seed, "global_batch_size": config.batch_size}
    checkpoint_results = {}
    for source, target in (("one", "fsdp"), ("fsdp", "one")):
        with tempfile.TemporaryDirectory() as workdir:
            checkpointer = Checkpointer(workdir, keep=2)
            checkpointer.save(NUM_STEPS, runs[source]["state"], data_state)
            checkpointer.wait()
            restored, restored_data = checkpointer.restore(
                abstract_like(abstract_state, runs[target]["sharding"]))
            checkpointer.close()
        expected_specs = jax.tree.leaves(jax.tree.map(lambda s: tuple(s.spec), runs[target]["sharding"]))
        got_specs = jax.tree.leaves(jax.tree.map(lambda a: tuple(a.sharding.spec), restored))
        checkpoint_results[f"{source}_to_{target}"] = dict(
            diffs=field_diffs(runs[source]["state"], restored),
            specs_match=expected_specs == got_specs,
            num_sharded_params=sum("fsdp" in spec for spec in
                                   jax.tree.leaves(jax.tree.map(lambda a: tuple(a.sharding.spec), restored.params))),
            device_counts=sorted({len(a.sharding.device_set) for a in jax.tree.leaves(restored)}),
            data_state=restored_data,
            params=describe_shardings(restored.params),
        )
    results["checkpoint"] = checkpoint_results
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=list)


if __name__ == "__main__":
    main(sys.argv[1])
