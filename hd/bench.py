"""Cost of each stage's train step for one model, batch and process: FLOPs, memory, step time, MFU.

    python -m hd.bench --config=configs/fashion_mnist.py:sketch [--steps=20] [--config.batch_size=64 ...]

Every step is compiled ahead of time (jax.jit(step, donate_argnums=0).lower(...).compile()) and reports
- FLOPs per step (compiled.cost_analysis()),
- memory (compiled.memory_analysis()): arguments, outputs, temporaries; peak = arguments + outputs - aliased
  (the donated state is reused for the new state) + temporaries,
- the median wall time of --steps runs after --warmup runs (each waited for with block_until_ready; the
  steps take turns, one run each per round, so that other processes on the machine slow them alike),
- achieved FLOP/s and MFU = achieved / the float32 matmul rate measured in the same process.
Then the ratios of every step to the teacher's, against the goals in GOALS, and two throughputs:
- sampling: images/s of the one-step generator (one mean-flow jump) and of the teacher's Euler sampler with
  --teacher_steps steps and the config's CFG (two network passes per step), batch = config.batch_size;
- data: batches/s of the training input pipeline (the config's dataset, iterator and host-to-device copy) against
  the batches/s each train step consumes.

No checkpoint or dataset is read: parameters are random initialisations (the teacher of the sketch step too)
and the batch is random data of the dataset's shape. To add a stage, add one entry to `train_steps`:
name -> (step_fn, args), with step_fn(state, *rest) -> (state, metrics) and args = (state, *rest).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Ratio of each step to the teacher's flow-matching step that the design aims for.
GOALS = {"sketch": {"time": 2.2, "peak_memory": 2.0}}
# MFU goals on the 2-core CPU (issue targets) and the input pipeline's margin over the fastest consumer.
MFU_GOALS = {"teacher": 0.5, "sketch": 0.4, "refine": 0.4}
DATA_GOAL = 10.0
# The refine entry is one two time-scale cycle: k steps holding one generator update and k critic updates.
# Example shapes of the datasets whose shape is known without reading them.
DATA_SHAPES = {"fashion_mnist": (28, 28, 1), "toy2d": (2,)}

Entry = tuple[Callable[..., tuple[Any, dict]], tuple]


def data_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    if config.data.name in DATA_SHAPES:
        return DATA_SHAPES[config.data.name]
    from hd.data import load_source  # a prepared TFDS dataset: read its shape

    return tuple(load_source(config.data).example_shape)


def random_batch(config: ml_collections.ConfigDict, shape: tuple[int, ...], seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.standard_normal((config.batch_size, *shape)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, config.data.num_classes, config.batch_size), jnp.int32)}


def train_steps(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> dict[str, Entry]:
    """The steps to compare, each as (step_fn, args) on the same model and batch."""
    from hd.models import build_model
    from hd.train import steps
    from hd.train.stages import init_params, refine_stage_from, student_from_teacher, teacher_stage
    from hd.train.state import TrainState, make_optimizer

    batch = random_batch(config, shape)
    model = build_model(config.model, shape, config.data.num_classes)

    # (a) the teacher stage's own flow-matching step and state
    stage = teacher_stage(config, shape)
    teacher_state = jax.jit(stage.init_state)(jax.random.PRNGKey(config.seed))

    # (b) the sketch step as sketch_stage builds it, with a random teacher in place of a checkpoint. The state
    # is created under jit: TrainState.create alone would share buffers between params and ema_params, which a
    # donating step rejects.
    teacher_params = jax.jit(lambda key: init_params(model, key, shape))(jax.random.PRNGKey(config.seed + 1))
    optimizer = make_optimizer(config.optimizer)
    sketch_state = jax.jit(lambda tp: TrainState.create(student_from_teacher(tp), optimizer))(teacher_params)

    def sketch(state, batch, teacher):
        return steps.sketch_step(state, batch, teacher, model=model, optimizer=optimizer, config=config)

    # (c) one refine cycle (k = refine.generator_every steps: one generator update, k critic updates), the
    # refine stage built around the random teacher with the sketch student as generator.
    refine = refine_stage_from(config, shape, teacher_params, student_from_teacher(teacher_params))
    refine_state = jax.jit(refine.init_state)(jax.random.PRNGKey(config.seed + 2))
    k = config.refine.generator_every

    def refine_cycle(state, batch, teacher):
        # Unrolled, not a fori_loop: XLA's cost analysis counts a loop body once.
        for _ in range(k):
            state, metrics = refine.step(state, batch, teacher)
        return state, metrics

    # XLA's cost analysis counts the costlier branch of the step's lax.cond (the generator update) on every
    # step; run() recounts the cycle as one step that takes it and k - 1 that do not.
    refine_cycle.single_step, refine_cycle.cycle_length = refine.step, k

    return {
        "teacher": (lambda state, batch: stage.step(state, batch, None), (teacher_state, batch)),
        "sketch": (sketch, (sketch_state, batch, teacher_params)),
        f"refine_k{k}": (refine_cycle, (refine_state, batch, teacher_params)),
    }


def _first(analysis: Any) -> dict:
    """cost_analysis() is a dict in current jax, a one-element list in some older versions."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def compile_step(step_fn: Callable, args: tuple) -> tuple[Any, dict]:
    """Compile step_fn with the state donated, as the training loop does; its FLOPs and memory."""
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = _first(compiled.cost_analysis())
    flops = float(cost.get("flops", float("nan")))
    # Bytes read and written by all ops as XLA counts them: a low FLOPs-per-byte ratio means the step is bound
    # by memory traffic (normalisations, modulations, attention softmax), not by the matmul units.
    bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return compiled, {"compile_s": compile_s, "flops": flops, "bytes_accessed": bytes_accessed,
                      "flops_per_byte": flops / bytes_accessed, "memory_bytes": memory}


def cost_with_cond_branch(step_fn: Callable, args: tuple, take_true_branch: bool) -> dict[str, float]:
    """FLOPs and bytes of one step with every jax.lax.cond replaced by one of its branches (traced with the
    module attribute swapped, then compiled)."""
    original = jax.lax.cond

    def one_branch(pred, true_fn, false_fn, *operands):
        return (true_fn if take_true_branch else false_fn)(*operands)

    jax.lax.cond = one_branch
    try:
        lowered = jax.jit(lambda *a: step_fn(*a)).lower(*args)  # a new function: never a cached trace
    finally:
        jax.lax.cond = original
    cost = _first(lowered.compile().cost_analysis())
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


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


def matmul_rate(n: int, repeats: int = 10) -> float:
    """float32 FLOP/s of an n x n @ n x n matmul (median of `repeats` after one warm-up)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
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
    from hd.models import build_model, init_params
    from hd.train.stages import mean_flow_sampler, ode_sampler

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
    from hd import parallel
    from hd.data import make_batch_iterator

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
    head = (f"{'step':<10}{'GFLOP/step':>12}{'ms/step':>10}{'min..max ms':>16}{'GFLOP/s':>10}{'MFU':>8}"
            f"{'peak MiB':>10}{'temp MiB':>10}{'args MiB':>10}{'compile s':>11}")
    lines = [f"{report['config']}  batch {report['batch_size']}  model {report['model']}  on {report['device']}",
             f"float32 matmul {report['matmul_size']}^3: {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (MFU base; "
             + " / ".join(f"{r / 1e9:.1f}" for r in report["matmul_flops_per_s_before_after"]) + " before / after)",
             head, "-" * len(head)]
    for name, r in report["steps"].items():
        m = r["memory_bytes"]
        lines.append(f"{name:<10}{r['flops'] / 1e9:>12.3f}{r['step_s_median'] * 1e3:>10.1f}"
                     f"{r['step_s_min'] * 1e3:>8.1f}..{r['step_s_max'] * 1e3:<6.1f}"
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
        time_data: bool = True, stages: tuple[str, ...] = ("teacher", "sketch", "refine")) -> dict:
    shape = data_shape(config)
    entries = {name: entry for name, entry in train_steps(config, shape).items()
               if name == "teacher" or name.split("_")[0] in stages}
    compiled, results = {}, {}
    for name, (fn, args) in entries.items():
        compiled[name], results[name] = compile_step(fn, args)
        if hasattr(fn, "single_step"):  # a two time-scale cycle: count the generator update once
            k = fn.cycle_length
            with_update = cost_with_cond_branch(fn.single_step, args, True)
            without = cost_with_cond_branch(fn.single_step, args, False)
            r = results[name]
            r.update(flops_counted_by_xla=r["flops"], flops_step_with_generator_update=with_update["flops"],
                     flops_step_critic_only=without["flops"])
            r["flops"] = with_update["flops"] + (k - 1) * without["flops"]
            r["bytes_accessed"] = with_update["bytes_accessed"] + (k - 1) * without["bytes_accessed"]
            r["flops_per_byte"] = r["flops"] / r["bytes_accessed"]
    # The peak rate is measured before and after the steps and the higher reading kept: on a shared machine
    # one reading can be depressed by other processes (the min..max step times show how noisy a run was).
    rate_before = matmul_rate(matmul_size)
    times = time_steps(compiled, {name: args for name, (_, args) in entries.items()}, steps=steps, warmup=warmup)
    rate_after = matmul_rate(matmul_size)
    peak = max(rate_before, rate_after)
    for name, r in results.items():
        step_s = statistics.median(times[name])
        r.update(step_s_median=step_s, step_s_min=min(times[name]), step_s_max=max(times[name]), steps_timed=steps,
                 achieved_flops_per_s=r["flops"] / step_s, mfu=r["flops"] / step_s / peak)
        goal = mfu_goal(name)
        r.update(mfu_goal=goal, mfu_goal_met=None if goal is None else bool(r["mfu"] >= goal))
    sampling = sampling_rates(config, shape, teacher_steps)
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
            "data_shape": list(shape), "batch_size": config.batch_size, "sketch_target": config.sketch.target,
            "sketch_cfg_scale": config.sketch.cfg_scale, "matmul_size": matmul_size, "matmul_flops_per_s": peak,
            "matmul_flops_per_s_before_after": [rate_before, rate_after], "steps": results, "ratios": ratios(results),
            "sampling": sampling, "data": data}


def steps_in(name: str, config: ml_collections.ConfigDict) -> int:
    """Train steps (batches) in one timed entry: k for the refine cycle, else 1."""
    return config.refine.generator_every if name.startswith("refine") else 1


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main(argv: list[str]) -> None:
    del argv
    from hd.config import validate

    config = _CONFIG.value
    unknown = set(_STAGES.value) - {"teacher", "sketch", "refine"}
    if unknown:
        raise app.UsageError(f"--stages: unknown {sorted(unknown)}; choose from teacher, sketch, refine")
    # The usual checks (a bad override fails here), minus the teacher checkpoint this benchmark does not read.
    checked = config.copy_and_resolve_references()
    checked.sketch.teacher_workdir = checked.sketch.teacher_workdir or "(bench: random teacher)"
    validate(checked, jax.device_count())

    name = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    report = {"config": name + "".join(f" --config.{k}={v}" for k, v in sorted(_flatten(overrides).items())),
              **run(config, steps=_STEPS.value, warmup=_WARMUP.value, matmul_size=_MATMUL_SIZE.value,
                    teacher_steps=_TEACHER_STEPS.value, time_data=_DATA.value, stages=tuple(_STAGES.value))}
    text = json.dumps(report, indent=2)
    print(text)
    print()
    print(table(report))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":  # flags only here: importing this module (tests, notebooks) defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None,
                                              "Config file and variant, e.g. configs/fashion_mnist.py:sketch.")
    _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per train step (after the warm-up).")
    _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048,
                                        "Side of the square float32 matmul that sets the peak rate.")
    _JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the JSON report to this file.")
    _TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 32,
                                          "Euler steps of the teacher sampler in the sampling row.")
    _DATA = flags.DEFINE_bool("data", True, "Time the input pipeline (reads the config's dataset).")
    _STAGES = flags.DEFINE_list("stages", ["teacher", "sketch", "refine"],
                                "Steps to time; the teacher's is always timed (the baseline of the ratios).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
