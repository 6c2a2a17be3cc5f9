"""Cost of each stage's train step for one model, batch and process: FLOPs, memory, step time, MFU.

    python -m hd.bench --config=configs/fashion_mnist.py:sketch [--steps=20] [--config.batch_size=64 ...]

Every step is compiled ahead of time (jax.jit(step, donate_argnums=0).lower(...).compile()) and reports
- FLOPs per step: XLA's cost analysis of the lowered program. XLA counts a loop body once, so with
  model.scan_blocks (or model.remat, whose recomputation is not model work) the FLOPs are those of the same step
  with the blocks unrolled and nothing rematerialised, lowered on abstract inputs (never compiled or run): the
  model FLOPs that MFU is defined on. The compiled program's own count is kept as flops_compiled,
- memory (compiled.memory_analysis()): arguments, outputs, temporaries; peak = arguments + outputs - aliased
  (the donated state is reused for the new state) + temporaries,
- the median wall time of --steps runs after --warmup runs (each waited for with block_until_ready; the
  steps take turns, one run each per round, so that other processes on the machine slow them alike),
- images/s (examples consumed per second), achieved FLOP/s and MFU = achieved / the rate of a square matmul in
  the compute dtype (model.dtype unless --matmul_dtype) measured in the same process: the peak of this device
  as this process sees it (on a GPU an 8192^3 bfloat16 matmul, --matmul_size=8192).
Then the ratios of every step to the teacher's, against the goals in GOALS, and two throughputs:
- sampling: images/s of the one-step generator (one mean-flow jump) and of the teacher's Euler sampler with
  --teacher_steps steps and the config's CFG (two network passes per step), batch = config.batch_size;
- data: batches/s of the training input pipeline (the config's dataset, iterator and host-to-device copy) against
  the batches/s each train step consumes.

No checkpoint or dataset is read: parameters are random initialisations (the teacher of the sketch step too)
and the batch is random data of the dataset's shape (config.data.example_shape where set, e.g. 32x32x4 latents
for configs/imagenet256.py). With --data=false --sampling=false nothing outside jax, flax, optax, orbax, absl and
ml_collections is imported (no TensorFlow, TFDS or grain): the form for a bare accelerator machine.
`train_steps` builds every stage as training does (hd.train.stages); an entry is name -> Entry(step, args) (it
unpacks as (step, args)), with step(state, *rest) -> (state, metrics) and args = (state, *rest).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hd import flow, parallel
from hd.config import check_values, feature_block, flat_config
from hd.costs import cost_dict, lowered_cost
from hd.data import load_source, make_batch_iterator
from hd.models import average_velocity_apply, build_model, init_params, model_depth, velocity_apply
from hd.models.dit import DIT_SIZES
from hd.objectives.dmd import dmd_generator_loss
from hd.objectives.meanflow import sample_time_pairs
from hd.sampling import mean_flow_sampler, ode_sampler, one_step_generate
from hd.train.stages import build_stage, initial_state, stage_trees, student_from_teacher

# Ratio of each step to the teacher's flow-matching step that the design aims for.
GOALS = {"sketch": {"time": 2.2, "peak_memory": 2.0}}
# MFU goals on the 2-core CPU (what a PyTorch eager step of the same DiT reaches there) and the input pipeline's
# margin over the fastest consumer.
MFU_GOALS = {"teacher": 0.35, "sketch": 0.35, "refine": 0.4}
DATA_GOAL = 10.0
# The refine entry is one two time-scale cycle: k steps holding one generator update and k critic updates.
# Example shapes of the datasets whose shape is known without reading them.
DATA_SHAPES = {"fashion_mnist": (28, 28, 1), "toy2d": (2,)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One timed program: `step(*args)`. A refine cycle also names the single train step it repeats
    `cycle_length` times, whose generator update (a lax.cond) the FLOP count takes on one step of the cycle."""
    step: Callable[..., tuple[Any, dict]]
    args: tuple
    single_step: Callable[..., tuple[Any, dict]] | None = None
    cycle_length: int = 1

    def __iter__(self):  # `fn, args = entry`, as for a plain pair
        return iter((self.step, self.args))


def data_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    if config.data.example_shape:
        return tuple(config.data.example_shape)
    if config.data.name in DATA_SHAPES:
        return DATA_SHAPES[config.data.name]
    return tuple(load_source(config.data).example_shape)


def random_batch(config: ml_collections.ConfigDict, shape: tuple[int, ...], seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.standard_normal((config.batch_size, *shape)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, config.data.num_classes, config.batch_size), jnp.int32)}


def train_steps(config: ml_collections.ConfigDict, shape: tuple[int, ...], *, abstract: bool = False,
                stages: tuple[str, ...] = ("teacher", "sketch", "refine")) -> dict[str, Entry]:
    """The steps to compare, each as (step_fn, args) on the same model and batch: the teacher's and those of
    `stages`, each stage built as training builds it around a random teacher (and the student made from it as
    refine's generator). abstract=True: the args are ShapeDtypeStructs, for lowering without allocating."""
    batch = random_batch(config, shape)
    if abstract:
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    entries = {}
    for offset, name in enumerate(("teacher", "sketch", "refine")):
        if name != "teacher" and name not in stages:
            continue
        trees = stage_trees(config, shape, "abstract" if abstract else "random", stage=name)
        stage = build_stage(config, shape, trees, stage=name)
        state = initial_state(config, shape, trees, jax.random.PRNGKey(config.seed + offset), stage=name,
                              abstract=abstract)
        # The frozen trees (the teacher) are inputs of the compiled step, as in training, not constants in it.
        step = lambda state, batch, frozen, stage=stage: stage.step(state, batch, frozen)
        if name != "refine":
            entries[name] = Entry(step, (state, batch, stage.frozen))
            continue
        # One refine cycle: k = refine.generator_every steps, one generator update and k critic updates.
        k = config.refine.generator_every

        def refine_cycle(state, batch, frozen, step=step):
            # Unrolled, not a fori_loop: XLA's cost analysis counts a loop body once.
            for _ in range(k):
                state, metrics = step(state, batch, frozen)
            return state, metrics

        # XLA's cost analysis counts the costlier branch of the step's lax.cond (the generator update) on every
        # step; model_flops() recounts the cycle as one step that takes it and k - 1 that do not.
        entries[f"refine_k{k}"] = Entry(refine_cycle, (state, batch, stage.frozen), single_step=step, cycle_length=k)
    return entries


def compile_step(step_fn: Callable, args: tuple) -> tuple[Any, dict]:
    """Compile step_fn with the state donated, as the training loop does; its FLOPs (as compiled) and memory."""
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = cost_dict(compiled.cost_analysis())
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    # The compiled program's counts: after fusion (fewer bytes than the unoptimised program's), a scan's body
    # once, and the costlier branch of a lax.cond on every call.
    return compiled, {"compile_s": compile_s, "flops_compiled": float(cost.get("flops", float("nan"))),
                      "bytes_accessed_compiled": float(cost.get("bytes accessed", float("nan"))),
                      "memory_bytes": memory}


def cost_with_cond_branch(step_fn: Callable, args: tuple, take_true_branch: bool) -> dict[str, float]:
    """FLOPs and bytes of one step with every lax.cond at its top level (not inside a jit, scan or loop of its own)
    replaced by one of its branches: the traced program (jaxpr) is rewritten and lowered; jax itself is untouched."""
    closed, out_shapes = jax.make_jaxpr(step_fn, return_shape=True)(*args)
    out_tree = jax.tree.structure(out_shapes)

    def one_branch(*flat_args):
        env = dict(zip(closed.jaxpr.constvars, closed.consts)) | dict(zip(closed.jaxpr.invars, flat_args))
        read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
        for eqn in closed.jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if eqn.primitive.name == "cond":  # branches (false, true) of a boolean predicate, the index first
                outs = jax.extend.core.jaxpr_as_fun(eqn.params["branches"][int(take_true_branch)])(*ins[1:])
            else:
                with eqn.ctx.manager:  # the equation's own context (e.g. its remat or layout settings)
                    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return jax.tree.unflatten(out_tree, [read(v) for v in closed.jaxpr.outvars])

    return lowered_cost(one_branch, tuple(jax.tree.leaves(args)))


def with_depth(config: ml_collections.ConfigDict, depth: int, feature_block: int) -> ml_collections.ConfigDict:
    """The config's DiT with `depth` blocks, unrolled and not rematerialised, the refine head reading block
    `feature_block`: a program whose FLOPs XLA's cost analysis counts in full (it counts a scan's body once, and
    recomputed FLOPs are not model FLOPs). The size is registered in DIT_SIZES under a new name;
    forget_depths() removes it."""
    hidden, _, heads = DIT_SIZES[config.model.size]
    name = f"{config.model.size}@depth{depth}"
    DIT_SIZES[name] = (hidden, depth, heads)
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.model.size = name
        out.model.scan_blocks = False
        out.model.remat = False
        out.refine.feature_block = feature_block
    return out


def forget_depths() -> None:
    for name in [n for n in DIT_SIZES if "@depth" in n]:
        del DIT_SIZES[name]


def _count(entries: dict[str, Entry]) -> dict[str, dict[str, float]]:
    """XLA's FLOPs and bytes of each entry's lowered program (a refine cycle: one step taking the generator
    update and k - 1 that do not, since XLA counts the costlier branch of the step's lax.cond on every step)."""
    out = {}
    for name, entry in entries.items():
        fn, args = entry
        if entry.single_step is not None and entry.cycle_length > 1:
            k = entry.cycle_length
            with_update = cost_with_cond_branch(entry.single_step, args, True)
            without = cost_with_cond_branch(entry.single_step, args, False)
            out[name] = {key: with_update[key] + (k - 1) * without[key] for key in with_update}
            out[name].update(flops_step_with_generator_update=with_update["flops"],
                             flops_step_critic_only=without["flops"])
        else:  # k = 1: every step takes the generator update, which XLA counts right
            out[name] = lowered_cost(fn, args)
    return out


def model_flops(config: ml_collections.ConfigDict, shape: tuple[int, ...], entries: dict[str, Entry]
                ) -> dict[str, dict]:
    """Per entry: model FLOPs and bytes accessed of one call. For a scanned or rematerialised DiT the count is
    taken on the same steps with 1 or 2 unrolled blocks (abstract inputs, lowered, never compiled) and extended
    to the real depth: a step costs a + b * depth + c * (feature block + 1), since every block has the same
    shapes and the discriminator's backbone stops at the block its head reads (jit drops the unused rest). Exact,
    and quick where lowering the unrolled XL/2 steps would take minutes."""
    if not (config.model.name == "dit" and (config.model.get("scan_blocks", False)
                                            or config.model.get("remat", False))):
        out = _count(entries)
    else:
        stages = tuple(name.split("_")[0] for name in entries)
        try:  # (depth, feature block) = (1, 0), (2, 0), (2, 1)
            f10, f20, f21 = (_count(train_steps(with_depth(config, d, f), shape, abstract=True, stages=stages))
                             for d, f in ((1, 0), (2, 0), (2, 1)))
        finally:
            forget_depths()
        depth, feature = model_depth(config.model), feature_block(config)
        out = {name: {key: f10[name][key] + (depth - 1) * (f20[name][key] - f10[name][key])
                      + feature * (f21[name][key] - f20[name][key]) for key in f10[name]} for name in f10}
        for r in out.values():
            r["flops_counted_on"] = "1 and 2 unrolled blocks, extended to the model's depth"
    for r in out.values():
        r["flops_per_byte"] = r["flops"] / r["bytes_accessed"]
    return out


def signal_params(params: Any, seed: int = 0, std: float = 0.02) -> Any:
    """Parameters with every all-zero leaf (the DiT's adaLN and output layers start at zero, so a fresh network
    outputs exactly 0) drawn from N(0, std^2), as after training; the student's zeroed h-embedding is kept."""
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    leaves = [a if np.any(np.asarray(a)) or any(getattr(k, "key", None) == "h_embedder" for k in path)
              else jnp.asarray(std * rng.standard_normal(a.shape), a.dtype) for path, a in flat]
    return jax.tree.unflatten(tree, leaves)


def precision_errors(config: ml_collections.ConfigDict, shape: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """Relative errors ||a - b|| / ||b|| of model.dtype=bfloat16 (a) against float32 (b), on the same float32
    parameters (random, with signal_params) and inputs:
    - sketch_target: MeanFlow's u_tgt = v - clip(t - r) du/dt (the teacher's CFG velocity and the student's
      jax.jvp, at the config's time pairs), and its two parts sketch_velocity (v) and sketch_du_dt;
    - dmd_gradient: the DMD generator gradient g = (x_fake - x_real) / eta with respect to the generated
      images (the same x_g), real score the teacher with CFG, fake score the teacher with every leaf moved by 5 %
      of its spread (a fake score some updates in); dmd_gradient_fake_is_teacher: the fake score an exact copy,
      as at refine's first step, where g is the CFG term alone: a difference of two bfloat16 network outputs
      that float32 resolves and bfloat16 rounds away (the worst case)."""
    null, cfg = config.data.num_classes, config.sketch
    models = {}
    for dtype in ("float32", "bfloat16"):
        model_cfg = config.model.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.dtype = dtype
        models[dtype] = build_model(model_cfg, shape, null)
    teacher = signal_params(jax.jit(lambda key: init_params(models["float32"], key, shape))(
        jax.random.PRNGKey(seed)), seed)
    student = student_from_teacher(teacher)
    rng = np.random.default_rng(seed + 1)
    fake = jax.tree.map(lambda a: a + jnp.asarray(0.05 * float(jnp.std(a)) * rng.standard_normal(a.shape), a.dtype),
                        teacher)
    batch = random_batch(config, shape, seed)
    x, y = batch["x"], batch["y"]
    k_time, k_eps, k_dmd, k_noise = jax.random.split(jax.random.PRNGKey(seed), 4)
    t, r = sample_time_pairs(k_time, x.shape[0], mean=cfg.time_mean, std=cfg.time_std,
                             fraction_r_neq_t=max(cfg.fraction_r_neq_t, 0.5))
    z = flow.interpolate(x, jax.random.normal(k_eps, x.shape), t)
    x_g = jax.jit(lambda p: one_step_generate(models["float32"], p, jax.random.normal(k_noise, x.shape), y))(student)

    def measure(model):
        teacher_velocity = lambda z_, t_, y_: velocity_apply(model)(teacher, z_, t_, y_)
        v = flow.guided_velocity(teacher_velocity, null, cfg.cfg_scale, (cfg.cfg_t_min, cfg.cfg_t_max))(z, t, y)
        student_fn = lambda z_, t_, r_: average_velocity_apply(model)(student, z_, r_, t_, y)
        _, du_dt = jax.jvp(student_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
        span = jnp.clip(t - r, 0.0, 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
        real = flow.guided_velocity(teacher_velocity, null, config.refine.real_cfg_scale)
        dmd = lambda xg, fake_velocity: dmd_generator_loss(
            xg, y, k_dmd, real_velocity=real, fake_velocity=fake_velocity, t_min=config.refine.t_min,
            t_max=config.refine.t_max)[0]
        fake_velocity = lambda z_, t_, y_: velocity_apply(model)(fake, z_, t_, y_)
        return {"sketch_target": v - span * du_dt, "sketch_velocity": v, "sketch_du_dt": du_dt,
                "dmd_gradient": jax.grad(dmd)(x_g, fake_velocity),
                "dmd_gradient_fake_is_teacher": jax.grad(dmd)(x_g, teacher_velocity)}

    low, high = (jax.jit(lambda m=models[d]: measure(m))() for d in ("bfloat16", "float32"))
    return {name: float(jnp.linalg.norm((low[name] - high[name]).ravel()) / jnp.linalg.norm(high[name].ravel()))
            for name in high}


def time_steps(compiled: dict[str, Any], args: dict[str, tuple], *, steps: int, warmup: int) -> dict[str, list]:
    """Seconds per step of each compiled step, timed round-robin (every round runs each step once) so that a
    change in the machine's load affects all of them alike."""
    states = {name: a[0] for name, a in args.items()}
    times = {name: [] for name in compiled}
    for i in range(warmup + steps):
        for name, fn in compiled.items():
            t0 = time.perf_counter()
            states[name], metrics = fn(states[name], *args[name][1:])
            jax.block_until_ready((states[name], metrics))
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def matmul_rate(n: int, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of an n x n @ n x n matmul in `dtype` (median of `repeats` after one warm-up)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times)


def sampling_rates(config: ml_collections.ConfigDict, shape: tuple[int, ...], teacher_steps: int,
                   repeats: int = 3) -> dict[str, dict]:
    """Images/s of the one-step generator and of the teacher's CFG Euler sampler on random parameters."""
    model = build_model(config.model, shape, config.data.num_classes)
    params = jax.jit(lambda key: init_params(model, key, shape))(jax.random.PRNGKey(config.seed))
    noise = jax.random.normal(jax.random.PRNGKey(1), (config.batch_size, *shape))
    labels = jnp.arange(config.batch_size, dtype=jnp.int32) % config.data.num_classes
    samplers = {
        "one_step": (mean_flow_sampler(model, 1), 1),
        f"teacher_euler{teacher_steps}": (ode_sampler(model, config.data.num_classes, teacher_steps, "euler",
                                                      config.sample.cfg_scale), teacher_steps),
    }
    out = {}
    for name, (sampler, nfe) in samplers.items():
        fn = jax.jit(sampler).lower(params, noise, labels).compile()
        fn(params, noise, labels).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(params, noise, labels).block_until_ready()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        out[name] = {"nfe": nfe, "batch_size": config.batch_size, "seconds_per_batch": seconds,
                     "images_per_s": config.batch_size / seconds}
    teacher = out[f"teacher_euler{teacher_steps}"]["images_per_s"]
    out["one_step"]["speedup_over_teacher"] = out["one_step"]["images_per_s"] / teacher
    return out


def data_rate(config: ml_collections.ConfigDict, num_batches: int = 50) -> dict:
    """Batches/s of the training input pipeline as the loop runs it: the iterator's next batch, then the copy
    to the devices as one global array."""
    data = make_batch_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    sharding = parallel.batch_sharding(parallel.make_mesh(config.mesh.data, config.mesh.fsdp))
    jax.block_until_ready(parallel.global_batch(next(data), sharding))  # first-touch costs (page cache, permutation)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(parallel.global_batch(next(data), sharding))
    seconds = (time.perf_counter() - t0) / num_batches
    return {"batches_timed": num_batches, "seconds_per_batch": seconds, "batches_per_s": 1.0 / seconds}


def ratios(results: dict[str, dict], baseline: str = "teacher") -> dict[str, dict]:
    """Each step's time, peak memory and FLOPs over the baseline's, with the goals of GOALS where there are."""
    base = results[baseline]
    out = {}
    for name, r in results.items():
        if name == baseline:
            continue
        entry = {"time": r["step_s_median"] / base["step_s_median"],
                 "peak_memory": r["memory_bytes"]["peak"] / base["memory_bytes"]["peak"],
                 "flops": r["flops"] / base["flops"]}
        for key, limit in GOALS.get(name, {}).items():
            entry[f"{key}_goal"] = limit
            entry[f"{key}_goal_met"] = bool(entry[key] <= limit)
        out[f"{name}/{baseline}"] = entry
    return out


def mfu_goal(name: str) -> float | None:
    return MFU_GOALS.get(name.split("_")[0])


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f}"


def table(report: dict) -> str:
    head = (f"{'step':<10}{'GFLOP/step':>12}{'ms/step':>10}{'min..max ms':>16}{'images/s':>10}{'GFLOP/s':>10}"
            f"{'MFU':>8}{'peak MiB':>10}{'temp MiB':>10}{'args MiB':>10}{'compile s':>11}")
    lines = [f"{report['config']}  batch {report['batch_size']}  model {report['model']} ({report['dtype']}, "
             f"{report['attention']} attention)  on {report['device']}, jax {report['jax_version']}",
             f"{report['matmul_dtype']} matmul {report['matmul_size']}^3: {report['matmul_flops_per_s'] / 1e9:.1f} "
             "GFLOP/s (MFU base; "
             + " / ".join(f"{r / 1e9:.1f}" for r in report["matmul_flops_per_s_before_after"]) + " before / after)",
             head, "-" * len(head)]
    for name, r in report["steps"].items():
        m = r["memory_bytes"]
        lines.append(f"{name:<10}{r['flops'] / 1e9:>12.3f}{r['step_s_median'] * 1e3:>10.1f}"
                     f"{r['step_s_min'] * 1e3:>8.1f}..{r['step_s_max'] * 1e3:<6.1f}{r['images_per_s']:>10.1f}"
                     f"{r['achieved_flops_per_s'] / 1e9:>10.1f}{r['mfu']:>8.1%}{_mib(m['peak']):>10}"
                     f"{_mib(m['temp']):>10}{_mib(m['argument']):>10}{r['compile_s']:>11.1f}")
    for name, q in report["ratios"].items():
        parts = [f"{name}: time {q['time']:.2f}x", f"peak memory {q['peak_memory']:.2f}x", f"FLOPs {q['flops']:.2f}x"]
        for key in ("time", "peak_memory"):
            if f"{key}_goal" in q:
                parts.append(f"{key} goal <= {q[f'{key}_goal']}x {'met' if q[f'{key}_goal_met'] else 'NOT met'}")
        lines.append("; ".join(parts))
    for name, r in report["steps"].items():
        if r.get("mfu_goal") is not None:
            lines.append(f"{name}: MFU {r['mfu']:.1%}, goal >= {r['mfu_goal']:.0%} "
                         f"{'met' if r['mfu_goal_met'] else 'NOT met'}; {r['bytes_accessed'] / 1e9:.1f} GB accessed, "
                         f"{r['flops_per_byte']:.1f} FLOP/byte")
    sampling = report.get("sampling")
    if sampling:
        for name, r in sampling.items():
            lines.append(f"sampling {name}: {r['images_per_s']:.1f} images/s ({r['nfe']} NFE, batch "
                         f"{r['batch_size']}, {r['seconds_per_batch'] * 1e3:.0f} ms/batch)")
        lines.append(f"one-step speed-up over the teacher sampler: {sampling['one_step']['speedup_over_teacher']:.1f}x")
    data = report.get("data")
    if data:
        lines.append(f"data pipeline: {data['batches_per_s']:.1f} batches/s ({data['seconds_per_batch'] * 1e3:.2f} "
                     f"ms/batch); fastest step consumes {data['fastest_step_batches_per_s']:.2f} batches/s -> "
                     f"{data['margin']:.0f}x, goal >= {DATA_GOAL:.0f}x {'met' if data['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, steps: int, warmup: int, matmul_size: int, teacher_steps: int = 32,
        time_data: bool = True, stages: tuple[str, ...] = ("teacher", "sketch", "refine"), sampling: bool = True,
        matmul_dtype: str = "") -> dict:
    shape = data_shape(config)
    entries = train_steps(config, shape, stages=stages)
    compiled, results = {}, {}
    for name, (fn, args) in entries.items():
        compiled[name], results[name] = compile_step(fn, args)
        log(f"{name}: compiled in {results[name]['compile_s']:.1f} s")
    t0 = time.perf_counter()
    for name, cost in model_flops(config, shape, entries).items():
        results[name].update(cost)
    log(f"FLOPs counted in {time.perf_counter() - t0:.1f} s")
    # The peak rate is measured before and after the steps and the higher reading kept: on a shared machine
    # one reading can be depressed by other processes (the min..max step times show how noisy a run was).
    matmul_dtype = matmul_dtype or config.model.dtype
    rate_before = matmul_rate(matmul_size, matmul_dtype)
    times = time_steps(compiled, {name: args for name, (_, args) in entries.items()}, steps=steps, warmup=warmup)
    rate_after = matmul_rate(matmul_size, matmul_dtype)
    peak = max(rate_before, rate_after)
    for name, r in results.items():
        step_s = statistics.median(times[name])
        r.update(step_s_median=step_s, step_s_min=min(times[name]), step_s_max=max(times[name]), steps_timed=steps,
                 images_per_s=steps_in(name, config) * config.batch_size / step_s,
                 achieved_flops_per_s=r["flops"] / step_s, mfu=r["flops"] / step_s / peak)
        goal = mfu_goal(name)
        r.update(mfu_goal=goal, mfu_goal_met=None if goal is None else bool(r["mfu"] >= goal))
    log("steps timed")
    rates = sampling_rates(config, shape, teacher_steps) if sampling else None
    data = None
    if time_data:
        data = data_rate(config)
        # A refine entry is a cycle of k steps: it consumes k batches.
        consumed = max(steps_in(name, config) / r["step_s_median"] for name, r in results.items())
        data.update(fastest_step_batches_per_s=consumed, margin=data["batches_per_s"] / consumed)
        data["goal_met"] = bool(data["margin"] >= DATA_GOAL)
    model = (f"{config.model.name} {config.model.size}/p{config.model.patch_size}" if config.model.name == "dit"
             else f"{config.model.name} {config.model.width}x{config.model.depth}")
    device = jax.devices()[0]
    return {"device": f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s)", "model": model,
            "dtype": config.model.dtype, "attention": config.model.get("attention", "plain"),
            "scan_blocks": config.model.get("scan_blocks", False), "remat": config.model.get("remat", False),
            "jax_version": jax.__version__,
            "data_shape": list(shape), "batch_size": config.batch_size, "sketch_target": config.sketch.target,
            "sketch_cfg_scale": config.sketch.cfg_scale, "matmul_size": matmul_size, "matmul_dtype": matmul_dtype,
            "matmul_flops_per_s": peak, "matmul_flops_per_s_before_after": [rate_before, rate_after],
            "steps": results, "ratios": ratios(results), "sampling": rates, "data": data}


def log(message: str) -> None:
    """Progress on stderr (a run cut short by a time limit still shows how far it got)."""
    print(f"[hd.bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def steps_in(name: str, config: ml_collections.ConfigDict) -> int:
    """Train steps (batches) in one timed entry: k for the refine cycle, else 1."""
    return config.refine.generator_every if name.startswith("refine") else 1


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    unknown = set(_STAGES.value) - {"teacher", "sketch", "refine"}
    if unknown:
        raise app.UsageError(f"--stages: unknown {sorted(unknown)}; choose from teacher, sketch, refine")
    # The value checks (a bad override fails here); no hand-off checks: the benchmark's trees are random.
    check_values(config, jax.device_count())

    name = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    report = {"config": name + "".join(f" --config.{k}={v}" for k, v in sorted(flat_config(overrides).items())),
              **run(config, steps=_STEPS.value, warmup=_WARMUP.value, matmul_size=_MATMUL_SIZE.value,
                    teacher_steps=_TEACHER_STEPS.value, time_data=_DATA.value, stages=tuple(_STAGES.value),
                    sampling=_SAMPLING.value, matmul_dtype=_MATMUL_DTYPE.value)}
    text = json.dumps(report, indent=2)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            f.write(text + "\n")
    print(text)
    print()
    print(table(report))


if __name__ == "__main__":  # flags only here: importing this module (tests, notebooks) defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None,
                                              "Config file and variant, e.g. configs/fashion_mnist.py:sketch.")
    _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per train step (after the warm-up).")
    _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048,
                                        "Side of the square matmul that sets the peak rate (8192 on a GPU).")
    _MATMUL_DTYPE = flags.DEFINE_enum("matmul_dtype", "", ["", "float32", "bfloat16"],
                                      "Dtype of the peak-rate matmul; '' = config.model.dtype.")
    _SAMPLING = flags.DEFINE_bool("sampling", True,
                                  "Time the one-step and the teacher's sampler (two more compiles).")
    _JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the JSON report to this file.")
    _TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 32,
                                          "Euler steps of the teacher sampler in the sampling row.")
    _DATA = flags.DEFINE_bool("data", True, "Time the input pipeline (reads the config's dataset).")
    _STAGES = flags.DEFINE_list("stages", ["teacher", "sketch", "refine"],
                                "Steps to time; the teacher's is always timed (the baseline of the ratios).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
