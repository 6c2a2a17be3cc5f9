"""The one training loop every stage runs: config check, mesh, data, state, sharding, compiled step,
checkpoints, metrics and sample grids, then the loop itself."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics
from etils import epath
from jax.sharding import Mesh, NamedSharding

from hd import parallel, visualize
from hd.checkpoint import Checkpointer, abstract_like
from hd.config import check_example_shape, validate
from hd.data import make_batch_iterator
from hd.train.stages import Stage, build_stage


class NonFiniteError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after SIGTERM (any process's, with several) once a checkpoint is on disk; exit status 143 like a
    process killed by SIGTERM."""

    def __init__(self):
        super().__init__(143)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:  # the work directory is shared by all processes
        path = epath.Path(workdir) / "config.json"  # a local path or a URL (gs://...)
        tmp = path.with_name("config.json.tmp")
        tmp.write_text(config.to_json_best_effort(indent=2))
        tmp.replace(path)


def grid_inputs(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Fixed noise and labels for sample grids: one row per class, so grids compare across steps and stages."""
    if config.data.name == "toy2d":
        n = 4096
        labels = jnp.arange(n) % config.data.num_classes
    else:
        per_class = config.sample.per_class
        labels = jnp.repeat(jnp.arange(config.data.num_classes), per_class)
        n = labels.shape[0]
    noise = jax.random.normal(jax.random.PRNGKey(config.seed + 12345), (n, *data_shape))
    return noise, labels.astype(jnp.int32)


def render_samples(config: ml_collections.ConfigDict, samples: np.ndarray) -> np.ndarray:
    if config.data.name == "toy2d":
        return visualize.points_image(samples)
    return visualize.image_grid(samples, rows=config.data.num_classes)


def interval_averages(step_metrics: dict[str, jax.Array]) -> dict[str, metrics.Average]:
    """Every scalar a step returns as a clu Average over the logging interval. Metrics named 'generator/...'
    count only on steps that updated the generator (flag `generator_updated`, two time-scale refine)."""
    updated = step_metrics.get("generator_updated")
    return {k: metrics.Average.from_model_output(
        v[None], mask=(updated[None] > 0) if (updated is not None and k.startswith("generator/")) else None)
        for k, v in step_metrics.items()}


# One dispatch per step: building and merging the averages eagerly cost ~35 ms per step on the CPU, more than
# a toy model's whole step.
_first_averages = jax.jit(interval_averages)
_merge_averages = jax.jit(lambda totals, step_metrics: {
    k: totals[k].merge(v) for k, v in interval_averages(step_metrics).items()})


def compile_train_step(stage: Stage, mesh: Mesh, rules: Sequence[tuple[str, str]], abstract_state: Any
                       ) -> tuple[Callable, Any, Any, NamedSharding]:
    """The jitted step as the loop runs it: state and frozen trees sharded by the regex `rules`, batches split
    over every device, metrics replicated, the input state donated.

    Returns (step, state_sharding, frozen_sharding, batch_sharding); `step(state, batch, frozen)`.
    """
    state_sharding = parallel.tree_shardings(abstract_state, mesh, rules)
    frozen_sharding = parallel.tree_shardings(stage.frozen, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(stage.step, in_shardings=(state_sharding, batch_sharding, frozen_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))
    return step, state_sharding, frozen_sharding, batch_sharding


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) the stage named by `config.stage` in `workdir`; returns the last metrics.

    With several processes (parallel.initialize_distributed), every process runs this with the same config and
    work directory (a shared file system): each reads its own rows of every batch, all save and restore the
    checkpoints together, and only process 0 writes config.json, TensorBoard events and sample PNGs. Nothing
    that a collective waits on runs on one process only: sharded values are gathered on all, then written on 0.
    """
    # Config and data are checked before anything is compiled or written.
    validate(config, jax.device_count())
    data = make_batch_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    data_shape = check_example_shape(config.data, data.source.example_shape)  # == config.data.example_shape if set
    stage: Stage = build_stage(config, data_shape)

    # Mesh and shardings: parameters and optimizer states by rules, batches over all devices.
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    abstract_state = jax.eval_shape(stage.init_state, jax.random.PRNGKey(config.seed))
    train_step, state_sharding, frozen_sharding, batch_sharding = compile_train_step(
        stage, mesh, rules, abstract_state)
    # The data iterator gives process p rows [p*b, (p+1)*b) of every global batch (b = batch / processes); the
    # mesh must put exactly those rows on p's devices (parallel.make_mesh orders devices by process).
    rows = parallel.process_batch_rows(batch_sharding, config.batch_size)
    local = config.batch_size // jax.process_count()
    if (rows.start, rows.stop) != (jax.process_index() * local, (jax.process_index() + 1) * local):
        raise ValueError(f"process {jax.process_index()}: the mesh puts batch rows [{rows.start}, {rows.stop}) on "
                         f"this process's devices, the data iterator reads rows [{jax.process_index() * local}, "
                         f"{(jax.process_index() + 1) * local})")
    # Samples come back replicated, so every process can read them (np.asarray) and process 0 writes them.
    sample = jax.jit(stage.sample, out_shardings=parallel.replicated(mesh))
    grid_noise, grid_labels = grid_inputs(config, data_shape)  # uncommitted: the same on every process

    # Compile the step and trace the sampler before the work directory is touched, so a value that only fails
    # here (e.g. a patch size that does not tile the image) leaves an existing run as it was. The loop runs
    # this compiled executable, so nothing is compiled twice.
    first = data.get_state()
    probe = next(data)
    data.set_state(first)
    abstract_batch = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype, sharding=batch_sharding)
                      for k, v in probe.items()}
    train_step = train_step.lower(abstract_like(abstract_state, state_sharding), abstract_batch,
                                  abstract_like(stage.frozen, frozen_sharding)).compile()
    jax.eval_shape(stage.sample, abstract_state, stage.frozen, grid_noise, grid_labels)

    # State: newest complete checkpoint of this work directory, else fresh (or handed over by the stage).
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        if checkpointer.latest_step() is not None:
            state, data_state = checkpointer.restore(abstract_like(abstract_state, state_sharding))
            data.set_state(data_state)
            logging.info("resumed %s from step %d", stage.name, int(state.step))
        else:
            state = jax.jit(stage.init_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    except BaseException:  # e.g. a checkpoint of another architecture: release orbax's threads and files
        checkpointer.close()
        raise
    frozen = jax.device_put(stage.frozen, frozen_sharding)
    _write_config(config, workdir)

    # Imported here: clu's writers and periodic actions import TensorFlow (seconds), which compile_train_step's
    # users (sharding checks, notebooks) do not need.
    from clu import metric_writers, parameter_overview, periodic_actions

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if int(state.step) == 0:
        # Several processes: statistics by a jitted reduction on every process (the parameters may be sharded
        # over processes), logged by process 0.
        multi = jax.process_count() > 1
        parameter_overview.log_parameter_overview(state.params, include_stats="global" if multi else True,
                                                  jax_logging_process=0 if multi else None)
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    progress = periodic_actions.ReportProgress(num_train_steps=config.num_steps, writer=writer,
                                               every_steps=config.log_every)

    def write_samples(step: int) -> None:  # on every process: the sampler is a collective
        t0 = time.perf_counter()
        images = np.asarray(jax.device_get(sample(state, frozen, grid_noise, grid_labels)))
        grid = render_samples(config, images)
        if jax.process_index() == 0:
            visualize.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        writer.write_images(step, {"samples": grid[None]})
        writer.write_scalars(step, {"sample_seconds": time.perf_counter() - t0})

    # Scores inside training: the evaluation's feature net and reference set, this stage's sampler.
    scorer = None
    if config.eval_every:
        from hd.eval.evaluator import SampleScorer

        scorer = SampleScorer(config, os.path.join(workdir, "eval"))

    def write_scores(step: int) -> dict:  # on every process, like write_samples
        samples = np.asarray(jax.device_get(sample(state, frozen, scorer.noise, scorer.labels)))
        scores = {f"eval/{k}": v for k, v in scorer.score(samples).items() if v is not None}
        writer.write_scalars(step, scores)
        return scores

    step = int(state.step)
    averages, last = None, {}
    try:
        with metric_writers.ensure_flushes(writer), parallel.PreemptionNotice() as notice:
            while step < config.num_steps:
                batch = parallel.global_batch(next(data), batch_sharding)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, step_metrics = train_step(state, batch, frozen)
                step += 1
                averages = (_first_averages(step_metrics) if averages is None
                            else _merge_averages(averages, step_metrics))
                progress(step)
                preempted = notice.reached(step)  # the same answer on every process

                if step % config.log_every == 0 or step == config.num_steps:
                    last = {k: float(v.compute()) for k, v in jax.device_get(averages).items()}
                    writer.write_scalars(step, last)
                    averages = None
                    if int(state.consecutive_skips) >= config.max_consecutive_skips:
                        raise NonFiniteError(
                            f"step {step}: {int(state.consecutive_skips)} non-finite updates in a row (limit "
                            f"config.max_consecutive_skips={config.max_consecutive_skips}); parameters are those "
                            f"of the last finite update and the checkpoints were left as they were. Lower "
                            "config.optimizer.lr or check the data.")
                if step % config.checkpoint_every == 0 or step == config.num_steps or preempted:
                    checkpointer.save(step, state, data.get_state())
                if preempted:
                    checkpointer.wait()
                    if notice.synced:
                        logging.warning("SIGTERM: saved checkpoint at step %d, the step all %d processes agreed "
                                        "on; exiting", step, jax.process_count())
                    else:
                        logging.warning("SIGTERM: saved checkpoint at step %d, exiting", step)
                    raise Preempted()
                if (config.sample_every and step % config.sample_every == 0) or step == config.num_steps:
                    write_samples(step)
                if scorer is not None and (step % config.eval_every == 0 or step == config.num_steps):
                    last.update(write_scores(step))
    finally:
        checkpointer.close()
    return last


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
