"""Run by tests/conftest.py (fixture `sharding_results`) with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Builds the step of every training stage for toy2d (MLP; a DiT step takes far longer to compile on 8 CPU
devices) exactly as hd.train.loop does (stage -> compile_train_step): the teacher (toy2d:tiny), the sketch
(toy2d:sketch_tiny, around a teacher) and the refine stage (toy2d:refine_tiny, around a teacher and a generator).
The teacher and generator trees are fresh random parameters handed to hd.train.stages.sketch_stage /
refine_stage (what build_stage does with checkpointed ones; the sharding does not depend on
where the values came from). Each stage runs the same few steps on a 1-device mesh and on a data=2 x fsdp=4 mesh,
and the JSON file named by argv[1] gets, per stage (results["stages"][name]):
- the largest differences between the two runs (every state field, metrics) and the size of each tree's update,
- the sharding of every array of every tree on the 8-device mesh (spec, global and per-device shapes): the
  trained parameters, their EMA and optimizer moments, refine's critic (fake score, GAN head) and its
  optimizer moments, and the frozen teacher the sketch and refine steps read;
and for the teacher, checkpoint round trips across meshes (results["checkpoint"]): saved from the 1-device
state and restored onto the fsdp shardings, and the reverse.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (before jax is imported)")
# Both meshes' programs compiled without LLVM's optimisation passes: about half the compile time of the six steps
# (the refine step on 8 devices alone took ~40 s on the 2-core CPU). XLA's own passes, the SPMD partitioning
# under test among them, still run, and the float semantics stay strict (no fast-math either way).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hd import parallel  # noqa: E402
from hd.checkpoint import Checkpointer, abstract_like  # noqa: E402
from hd.config import validate  # noqa: E402
from hd.models import build_model, init_params  # noqa: E402
from hd.train.loop import compile_train_step  # noqa: E402
from hd.train.stages import build_stage, refine_stage, sketch_stage, student_from_teacher  # noqa: E402

NUM_STEPS = 3
DATA_SHAPE = (2,)
VARIANTS = {"teacher": "tiny", "sketch": "sketch_tiny", "refine": "refine_tiny"}


def load_config(stage: str = "teacher"):
    spec = importlib.util.spec_from_file_location("toy2d_config", os.path.join(REPO, "configs", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(VARIANTS[stage])
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.optimizer.warmup_steps = 0  # full learning rate from the first step, so every step moves the weights
    # Never read (make_stage hands the trees over directly); set so validate() accepts the config.
    config.sketch.teacher_workdir = config.refine.teacher_workdir = config.refine.sketch_workdir = "/unused"
    return config


def make_stage(config):
    """The stage as the loop builds it; the sketch and refine stages around random teacher / generator trees."""
    if config.stage == "teacher":
        return build_stage(config, DATA_SHAPE)
    model = build_model(config.model, DATA_SHAPE, config.data.num_classes)
    teacher = init_params(model, jax.random.PRNGKey(101), DATA_SHAPE)
    if config.stage == "sketch":
        return sketch_stage(config, DATA_SHAPE, teacher)
    # A generator that is not the teacher, so the DMD gradient is not zero from the first step.
    generator = student_from_teacher(init_params(model, jax.random.PRNGKey(102), DATA_SHAPE))
    return refine_stage(config, DATA_SHAPE, teacher, generator)


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {parallel.path_name(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0)
               for k in a)


def field_names(state) -> list[str]:
    return [f.name for f in dataclasses.fields(state)]


def field_diffs(a, b) -> dict[str, float]:
    return {name: max_abs_diff(flat(getattr(a, name)), flat(getattr(b, name))) for name in field_names(a)}


TREES = ("params", "ema_params", "opt_state", "critic_params", "critic_opt_state")


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


MESHES = ("one", "fsdp")


def prepare_stage(name: str) -> dict:
    """Stage, initial state, batches and the lowered step for both meshes (compiled later, all together)."""
    config = load_config(name)
    validate(config, jax.device_count())
    stage = make_stage(config)
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
    lowered = {}
    for mesh_name, mesh in meshes.items():
        # The loop's jitted step, lowered for these shapes and shardings as hd.train.loop does.
        step, state_sharding, frozen_sharding, batch_sharding = compile_train_step(stage, mesh, rules, abstract_state)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                          for k, v in batches[0].items()}
        lowered[mesh_name] = dict(
            lowered=step.lower(abstract_like(abstract_state, state_sharding), abstract_batch,
                               abstract_like(stage.frozen, frozen_sharding)),
            state_sharding=state_sharding, frozen_sharding=frozen_sharding, batch_sharding=batch_sharding)
    return dict(name=name, config=config, stage=stage, abstract_state=abstract_state, batches=batches,
                initial=initial, lowered=lowered)


def compile_all(prepared: list[dict]) -> None:
    """Compile every stage's two steps in threads (XLA compiles outside the GIL): on 2 cores this takes ~3/4 of
    the time of one after the other, or less on an idle machine. The biggest (refine, 8 devices) goes first."""
    jobs = [(p, m) for p in reversed(prepared) for m in reversed(MESHES)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for (p, m), compiled in zip(jobs, pool.map(lambda job: job[0]["lowered"][job[1]]["lowered"].compile(), jobs)):
            p["lowered"][m]["compiled"] = compiled


def run_stage(p: dict) -> dict:
    """NUM_STEPS steps of one stage on one device and on the 8-device mesh, from the same state and batches."""
    start = time.perf_counter()
    config, stage, abstract_state = p["config"], p["stage"], p["abstract_state"]
    runs = {}
    for mesh_name in MESHES:
        low = p["lowered"][mesh_name]
        step, state_sharding, batch_sharding = low["compiled"], low["state_sharding"], low["batch_sharding"]
        state = jax.device_put(p["initial"], state_sharding)
        init = jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(state))
        frozen = jax.device_put(stage.frozen, low["frozen_sharding"])
        metrics = []
        for batch in p["batches"]:
            state, m = step(state, parallel.global_batch(batch, batch_sharding), frozen)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        runs[mesh_name] = dict(init=init, state=state, metrics=metrics, sharding=state_sharding, frozen=frozen)

    one, fsdp = runs["one"], runs["fsdp"]
    trees = [t for t in TREES if hasattr(one["state"], t)]
    result = dict(
        init_diffs=field_diffs(one["init"], fsdp["init"]),
        final_diffs=field_diffs(one["state"], fsdp["state"]),
        metric_diffs={k: max(abs(a[k] - b[k]) for a, b in zip(one["metrics"], fsdp["metrics"]))
                      for k in one["metrics"][0]},
        metrics_one=one["metrics"],
        # How far each tree moved in NUM_STEPS steps (the scale the differences are judged against).
        update_sizes={t: max_abs_diff(flat(getattr(one["state"], t)), flat(getattr(one["init"], t))) for t in trees},
        final_step=int(fsdp["state"].step),
        lr=config.optimizer.lr,
        critic_lr=config.refine.critic_lr,
        generator_every=config.refine.generator_every,
        trees_fsdp={t: describe_shardings(getattr(fsdp["state"], t)) for t in trees},
        frozen_fsdp=describe_shardings(fsdp["frozen"]) if stage.frozen is not None else None,
        params_one=describe_shardings(one["state"].params),
        run_seconds=time.perf_counter() - start,
    )
    return dict(result, runs=runs, abstract_state=abstract_state, config=config)


def main(out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    start = time.perf_counter()
    prepared = [prepare_stage(name) for name in VARIANTS]
    prepare_seconds = time.perf_counter() - start
    compile_all(prepared)
    compile_seconds = time.perf_counter() - start - prepare_seconds
    stages = {p["name"]: run_stage(p) for p in prepared}
    results = dict(
        devices=jax.device_count(),
        mesh_shape=dict(parallel.make_mesh(2, 4).shape),
        seconds=dict(prepare=prepare_seconds, compile=compile_seconds, total=time.perf_counter() - start),
        stages={name: {k: v for k, v in r.items() if k not in ("runs", "abstract_state", "config")}
                for name, r in stages.items()},
    )
    teacher = stages["teacher"]
    runs, abstract_state, config = teacher["runs"], teacher["abstract_state"], teacher["config"]

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
