"""The one training loop every stage runs: config check, mesh, data, state, sharding, compiled step,
checkpoints, metrics and sample grids, then the loop itself."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shlex
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hd import parallel, visualize
from hd.checkpoint import (Checkpointer, DiskFullError, WriterLock, abstract_like, complete_steps, is_disk_full,
                           move_steps_aside, read_stored_config)
from hd.config import (check_example_shape, config_changes, flat_config, format_changes, run_defining_changes,
                       validate)
from hd.data import make_batch_iterator
from hd.eval import heatmaps
from hd.eval.evaluator import SampleScorer
from hd.files import replace_text
from hd.eval.inception import quantize_to_uint8
from hd.models.vae import CONFIG_NAME, WEIGHTS_NAME, load_vae
from hd.train.stages import Stage, build_stage, hand_off_sources

HISTORY_FILE = "config_history.jsonl"


class NonFiniteError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after SIGTERM (any process's, with several) once a checkpoint is on disk; exit status 143 like a
    process killed by SIGTERM."""

    def __init__(self):
        super().__init__(143)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def config_text(config: ml_collections.ConfigDict, sources: dict) -> str:
    """config.json: the config, plus `sources` (what the hand-offs read) for stages built from others."""
    content = json.loads(config.to_json_best_effort())
    if sources:
        content["sources"] = sources
    return json.dumps(content, indent=2)


def _record_start(config: ml_collections.ConfigDict, workdir: str, record: dict, sources: dict) -> None:
    """Process 0: rewrite config.json only when it changes, and append this start to the config history, so
    the settings every step range was trained with stay on record (config.json holds the newest only)."""
    if jax.process_index() != 0:  # the work directory is shared by all processes
        return
    path = epath.Path(workdir) / "config.json"  # a local path or a URL (gs://...)
    text = config_text(config, sources)
    if not path.exists() or path.read_text() != text:
        replace_text(path, text)
    history = epath.Path(workdir) / HISTORY_FILE
    previous = history.read_text() if history.exists() else ""  # no append on object stores: rewrite
    replace_text(history, previous + json.dumps(record) + "\n")


def _compare_with_stored(config: ml_collections.ConfigDict, workdir: str, stored: dict | None,
                         steps: list[int]) -> dict[str, tuple[Any, Any]]:
    """Before anything compiles: the keys that differ from the run's config.json. Keys that define the run
    (hd.config.RESUMABLE_KEYS lists the others) are one error naming each with both values; the others are
    returned, to be logged and kept in the config history."""
    if stored is None:
        if steps:
            logging.warning("%s has checkpoints (steps %s) but no config.json to compare this config with: "
                            "taking this config as the run's", workdir, steps)
        return {}
    changes = config_changes(stored, config)
    if not steps:  # nothing trained yet: the earlier config.json is just replaced (and the change recorded)
        return changes
    fixed = run_defining_changes(changes)
    if fixed:
        raise ValueError(
            f"{workdir} holds a run (checkpoint steps {steps}) whose config.json has other values for keys that "
            f"define the run (parameter shapes, data, batch, random stream, objective): {format_changes(fixed)}. "
            "Resume with the stored values, or start a new run in another --workdir. (Keys that may change on "
            "resume: hd.config.RESUMABLE_KEYS.)")
    return changes


def _restore_request(config: ml_collections.ConfigDict, workdir: str, stored: dict | None,
                     steps: list[int]) -> int | None:
    """The older step config.restore_step asks to resume from, or None. It acts once: when config.json already
    holds the same value, an earlier start applied it (this is e.g. a rerun after a preemption)."""
    step = config.restore_step
    if step in (0, -1):
        return None
    if stored is not None and stored.get("restore_step") == step:
        logging.info("config.restore_step=%d was applied by an earlier start (see %s): resuming from the newest "
                     "checkpoint", step, HISTORY_FILE)
        return None
    if step not in steps:
        raise ValueError(f"config.restore_step={step} is not a checkpoint step of {workdir}: it has steps {steps} "
                         "(0 = the newest)")
    return step


def resume_command(config: ml_collections.ConfigDict, workdir: str, command: Sequence[str] | None,
                   restore_step: int) -> str:
    """The command that resumes this run from `restore_step` with a tenth of the learning rate: the given
    command line (hd.main's) with those two flags replaced."""
    replaced = ("--config.restore_step", "--config.optimizer.lr")
    if command:
        args, skip = [], False
        for arg in command[1:]:
            if skip:
                skip = False
            elif arg in replaced:
                skip = True  # '--flag value' form
            elif not arg.startswith(tuple(f"{r}=" for r in replaced)):
                args.append(arg)
    else:
        args = ["--config=CONFIG_FILE:VARIANT", f"--workdir={workdir}"]
    args += [f"--config.restore_step={restore_step}", f"--config.optimizer.lr={config.optimizer.lr / 10:g}"]
    return "python -m hd.main " + shlex.join(args)


def _non_finite_error(config: ml_collections.ConfigDict, workdir: str, command: Sequence[str] | None, step: int,
                      skips: int, steps_on_disk: list[int], what: str) -> NonFiniteError:
    first_skip = step - skips + 1
    # The update just before the first skipped one may itself have been the blow-up (finite but huge weights):
    # point at a checkpoint from before it.
    before = [s for s in steps_on_disk if s <= first_skip - 2]
    message = (f"step {step}: {skips} non-finite updates in a row {what}; parameters are those of the last finite "
               f"update and no checkpoint was written since (checkpoints on disk: steps {steps_on_disk}). ")
    if before:
        message += (f"Lower config.optimizer.lr or check the data, then resume from step {before[-1]}, the newest "
                    f"checkpoint from before step {first_skip - 1} (the last update before the first skipped one; "
                    f"pick an older step if that one had already diverged; newer steps are moved to "
                    f"{workdir}/checkpoints_abandoned_<time>/, not deleted): "
                    f"{resume_command(config, workdir, command, before[-1])}")
    else:
        message += (f"No checkpoint is older than step {first_skip - 1}: lower config.optimizer.lr or check the "
                    f"data and start again in a new --workdir.")
    return NonFiniteError(message)


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
    """Grid samples (points, images in [-1, 1], or uint8 images decoded by `grid_decoder`) -> one uint8 image."""
    if config.data.name == "toy2d":
        return visualize.points_image(samples)
    return visualize.image_grid(samples, rows=config.data.num_classes)


def load_grid_vae(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Any:
    """The VAE config.sample.vae_dir names (an hd.models.vae.VAE), checked against the data; None for ''.

    Checked before anything compiles or is written: the folder's files, their sha256 (config.sample.vae_sha256),
    latent channels against the examples, and scaling_factor against config.data.latent_scale for posterior
    datasets (whose metadata the latent source has checked that scale against already)."""
    directory = config.sample.vae_dir
    if not directory:
        if len(data_shape) == 3 and data_shape[-1] not in (1, 3):
            logging.warning("sample grids show the raw %d-channel examples: set config.sample.vae_dir to the VAE "
                            "the latents were made with to see decoded images", data_shape[-1])
        return None
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise ValueError(f"config.sample.vae_dir={directory!r} lacks {', '.join(missing)}: set it to the diffusers "
                         "AutoencoderKL folder the latents were made with (prepare_latents --vae), or to '' for "
                         "grids of the data as it is")
    if len(data_shape) != 3:
        raise ValueError(f"config.sample.vae_dir is set, but the examples of config.data.name="
                         f"{config.data.name!r} have shape {data_shape}, not latent images (h, w, c): set it to ''")
    try:
        vae = load_vae(directory, sha256=config.sample.vae_sha256)
    except ValueError as e:  # a wrong sha256 or weights that do not fit the folder's config.json
        raise ValueError(f"config.sample.vae_dir={directory!r} (config.sample.vae_sha256="
                         f"{config.sample.vae_sha256!r}): {e}") from e
    if vae.module.latent_channels != data_shape[-1]:
        raise ValueError(f"config.sample.vae_dir={directory!r} holds a VAE with {vae.module.latent_channels} latent "
                         f"channels, but the examples have shape {data_shape}: use the VAE the latents were made with")
    scale = config.data.latent_scale
    if config.data.latent_posterior and not np.isclose(vae.scaling_factor, scale, rtol=1e-6):
        raise ValueError(f"config.sample.vae_dir={directory!r} holds a VAE with scaling_factor {vae.scaling_factor}, "
                         f"but the model trains on latents x config.data.latent_scale={scale}: use the VAE the "
                         "latents were made with")
    return vae


# Latents per device per decoder call: bounds the decoder's activations (~1.5 GB for 8 SD-VAE images at 256 px).
GRID_DECODE_ROWS = 8


def grid_decoder(vae: Any, mesh: Mesh, rows_per_call: int = GRID_DECODE_ROWS) -> Callable[[jax.Array], jax.Array]:
    """latents x scaling_factor [N, h, w, c] -> uint8 images [N, H, W, 3], replicated (every process reads them),
    in one jitted call with the VAE's parameters replicated over `mesh`."""
    params = jax.device_put(vae.params, parallel.replicated(mesh))
    decode = functools.partial(_decode_grid, module=vae.module, scale=vae.scaling_factor, mesh=mesh,
                               rows_per_call=rows_per_call)
    return lambda latents: decode(params, latents)


@functools.partial(jax.jit, static_argnames=("module", "scale", "mesh", "rows_per_call"))
def _decode_grid(params: Any, latents: jax.Array, *, module: Any, scale: float, mesh: Mesh,
                 rows_per_call: int) -> jax.Array:
    """The grid's rows split over every device (padded to a multiple of the device count), each device decoding
    its rows `rows_per_call` at a time (lax.map): a 1000-image ImageNet grid would not fit one decoder call.
    Module-level with static arguments, so the stages of one process share the compiled decoder."""
    n = latents.shape[0]
    per_device = -(-n // mesh.size)
    calls = -(-per_device // rows_per_call)
    chunk = -(-per_device // calls)  # equal chunks, least padding
    pad = mesh.size * calls * chunk - n
    z = jnp.pad(latents.astype(jnp.float32) / scale, ((0, pad),) + ((0, 0),) * (latents.ndim - 1))

    def local(p: Any, rows: jax.Array) -> jax.Array:
        rows = rows.reshape(calls, chunk, *rows.shape[1:])
        images = jax.lax.map(lambda zc: quantize_to_uint8(module.apply({"params": p}, zc, method="decode")), rows)
        return images.reshape(calls * chunk, *images.shape[2:])

    batch = PartitionSpec(parallel.AXES)
    images = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), batch), out_specs=batch)(params, z)
    return jax.lax.with_sharding_constraint(images[:n], parallel.replicated(mesh))


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


def train(config: ml_collections.ConfigDict, workdir: str, *, command: Sequence[str] | None = None) -> dict:
    """Run (or resume) the stage named by `config.stage` in `workdir`; returns the last metrics ({} when no step
    ran). `command`: the command line that started it (hd.main's sys.argv), quoted in error messages that say
    how to resume.

    With several processes (parallel.initialize_distributed), every process runs this with the same config and
    work directory (a shared file system): each reads its own rows of every batch, all save and restore the
    checkpoints together, and only process 0 takes the writer lock and writes config.json, the config history,
    TensorBoard events and sample PNGs. Nothing that a collective waits on runs on one process only: sharded
    values are gathered on all, then written on 0.
    """
    # Config, the work directory's record of the run and data are checked before anything is compiled or written.
    validate(config, jax.device_count())
    stored = read_stored_config(workdir)
    steps = complete_steps(workdir)
    changes = _compare_with_stored(config, workdir, stored, steps)
    restore_to = _restore_request(config, workdir, stored, steps)
    start = restore_to if restore_to is not None else (steps[-1] if steps else 0)
    if steps and start >= config.num_steps:
        # Nothing to train: nothing is written either (so this works on read-only storage).
        if start > config.num_steps:
            logging.warning("config.num_steps=%d but %s is already at step %d: nothing to train, nothing written "
                            "(the checkpoints stay at step %d; pass --config.num_steps=N with N > %d to train "
                            "further)", config.num_steps, workdir, start, start, start)
        else:
            logging.info("%s in %s is finished: step %d of num_steps=%d (checkpoint steps %s); nothing to do",
                         config.stage, workdir, start, config.num_steps, steps)
        return {}
    lock = WriterLock(workdir) if jax.process_index() == 0 else None  # one job: process 0 speaks for it
    if lock is not None:
        lock.check()
    sources = hand_off_sources(config)  # checked and recorded; the stage builder reads them
    data = make_batch_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    data_shape = check_example_shape(config.data, data.source.example_shape)  # == config.data.example_shape if set
    grid_vae = load_grid_vae(config, data_shape)  # None: grids show the data as it is
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
    decode_grid = grid_decoder(grid_vae, mesh) if grid_vae is not None else None
    # Where the AWD head looks on the grid samples (refine with an AWD head, on images), jitted once and computed
    # from the live critic. Not for latents decoded for the grid: the token grid lies on the latents, and an
    # overlay on the decoded RGB images is not drawn.
    weigh = (jax.jit(stage.token_weights, out_shardings=parallel.replicated(mesh))
             if stage.token_weights is not None and decode_grid is None else None)

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
    grid_shape = jax.eval_shape(stage.sample, abstract_state, stage.frozen, grid_noise, grid_labels)
    if decode_grid is not None:
        jax.eval_shape(decode_grid, grid_shape)  # latents the VAE cannot decode fail here, not at the first grid
    if weigh is not None:
        jax.eval_shape(stage.token_weights, abstract_state, stage.frozen, grid_shape, grid_labels)

    # From here on the work directory is written: by this job alone (the lock); a full disk is one clear error.
    with _writing(workdir, lock) as status:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        record = {"time": _now(), "start_step": 0, "num_steps": config.num_steps,
                  "changes": {k: list(v) for k, v in sorted(changes.items())}}
        if restore_to is not None:
            newer = [s for s in complete_steps(workdir) if s > restore_to]
            if newer and jax.process_index() == 0:
                moved = move_steps_aside(workdir, newer, f"checkpoints_abandoned_{stamp}")
                logging.warning("config.restore_step=%d: moved the newer checkpoint steps %s to %s (not deleted)",
                                restore_to, newer, moved)
                record["abandoned"] = {"steps": newer, "to": moved}
            _sync("hd_restore_step")

        # State: newest checkpoint of this work directory that restores, else fresh (or handed over by the stage).
        checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
        try:
            # total_skips at the newest checkpoint, and its step: when the next save finds no skipped update since,
            # the updates after that checkpoint were all finite, and it is pinned (see save()).
            skips_at_save, last_saved = 0, None
            if checkpointer.all_steps():
                state, restored = _resume(checkpointer, workdir, abstract_like(abstract_state, state_sharding), data,
                                          record, f"checkpoints_unreadable_{stamp}")
                checkpointer.pin(restored)  # never pruned before a newer checkpoint is confirmed good
                skips_at_save, last_saved = int(state.total_skips), restored
                logging.info("resumed %s from step %d", stage.name, int(state.step))
                if changes:
                    logging.info("settings changed on resume (kept in %s): %s", HISTORY_FILE, format_changes(changes))
                record["start_step"] = int(state.step)
            else:
                state = jax.jit(stage.init_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
            if restore_to is not None:
                record["restored_from"] = restore_to
            if sources:
                record["sources"] = sources
                for role, source in sources.items():
                    old = (stored or {}).get("sources", {}).get(role)
                    if old is not None and int(state.step) > 0 and (old["workdir"], old["step"]) != (
                            source["workdir"], source["step"]):
                        logging.warning("the %s this run was started from (%s step %s) has changed to %s step %s: "
                                        "the steps from %d on are trained against the new one (recorded in %s)", role,
                                        old["workdir"], old["step"], source["workdir"], source["step"],
                                        int(state.step), HISTORY_FILE)
            _record_start(config, workdir, record, sources)
        except BaseException:  # e.g. nothing restores: release orbax's threads and files
            checkpointer.close()
            raise
        frozen = jax.device_put(stage.frozen, frozen_sharding)

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
            writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                 for k, v in flat_config(config.to_dict()).items()})
        progress = periodic_actions.ReportProgress(num_train_steps=config.num_steps, writer=writer,
                                                   every_steps=config.log_every)

        def write_samples(step: int) -> None:  # on every process: the sampler is a collective
            t0 = time.perf_counter()
            images = sample(state, frozen, grid_noise, grid_labels)
            weights = None if weigh is None else heatmaps.host_weights(
                jax.device_get(weigh(state, frozen, images, grid_labels)))
            if decode_grid is not None:
                images = decode_grid(images)  # uint8 RGB
            images = np.asarray(jax.device_get(images))
            grid = render_samples(config, images)
            pictures = {"samples": grid}
            if weights is not None:  # the evaluation's layout: one row per class, images at 3x
                pictures["awd_heatmaps"] = heatmaps.awd_heatmap_grid(images, weights, config.data.num_classes)
            if jax.process_index() == 0:
                path = os.path.join(workdir, "samples", f"step_{step:07d}")
                visualize.save_png(grid, path + ".png")
                if weights is not None:
                    visualize.save_png(pictures["awd_heatmaps"], path + "_awd.png")
            writer.write_images(step, {name: picture[None] for name, picture in pictures.items()})
            writer.write_scalars(step, {"sample_seconds": time.perf_counter() - t0})

        # Scores inside training: the evaluation's feature net and reference set, this stage's sampler.
        scorer = None
        if config.eval_every:
            scorer = SampleScorer(config, config.eval.feature_dir or os.path.join(workdir, "eval"))

        def write_scores(step: int) -> dict:  # on every process, like write_samples
            samples = np.asarray(jax.device_get(sample(state, frozen, scorer.noise, scorer.labels)))
            scores = {f"eval/{k}": v for k, v in scorer.score(samples).items() if v is not None}
            writer.write_scalars(step, scores)
            return scores

        def save(step: int) -> None:
            """Checkpoint unless the newest update was non-finite. The previous checkpoint is pinned against
            pruning (keep_checkpoints) once this one finds every update since it finite: so whatever a divergence
            does, the newest checkpoint that finite updates followed stays, even with keep_checkpoints=1."""
            nonlocal skips_at_save, last_saved
            skips = int(state.consecutive_skips)
            if skips:
                logging.warning("step %d: no checkpoint written, the last %d updates were non-finite (the newest "
                                "checkpoint stays step %s)", step, skips, checkpointer.latest_step())
                return
            status["saving"] = step  # saves are asynchronous: a write error may surface steps later
            checkpointer.save(step, state, data.get_state())
            total = int(state.total_skips)
            if total == skips_at_save and last_saved is not None:
                checkpointer.pin(last_saved)
            skips_at_save, last_saved = total, step

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
                            raise _non_finite_error(config, workdir, command, step, int(state.consecutive_skips),
                                                    checkpointer.all_steps(), f"(limit config.max_consecutive_skips="
                                                    f"{config.max_consecutive_skips})")
                    if step % config.checkpoint_every == 0 or step == config.num_steps or preempted:
                        save(step)
                        if step == config.num_steps and int(state.consecutive_skips):
                            raise _non_finite_error(config, workdir, command, step, int(state.consecutive_skips),
                                                    checkpointer.all_steps(), "at the end of the run (num_steps="
                                                    f"{config.num_steps}), so no final checkpoint was written")
                    if preempted:
                        checkpointer.wait()
                        if notice.synced:
                            logging.warning("SIGTERM: saved checkpoint at step %d, the step all %d processes agreed "
                                            "on; exiting", checkpointer.latest_step(), jax.process_count())
                        else:
                            logging.warning("SIGTERM: saved checkpoint at step %d, exiting", checkpointer.latest_step())
                        raise Preempted()
                    if (config.sample_every and step % config.sample_every == 0) or step == config.num_steps:
                        write_samples(step)
                    if scorer is not None and (step % config.eval_every == 0 or step == config.num_steps):
                        last.update(write_scores(step))
        except NonFiniteError:
            _clear_restore_step(config, workdir)
            raise
        finally:
            checkpointer.close()  # waits for the last save: an asynchronous save's error surfaces here
        return last


@contextlib.contextmanager
def _writing(workdir: str, lock: WriterLock | None) -> Iterator[dict]:
    """The part of a run that writes the work directory: under the writer lock (process 0 takes it), and with
    'no space left' from any write (orbax raises it from its save threads in several forms) turned into one
    DiskFullError naming the directory and the checkpoint that is kept. Yields a dict where the loop notes the
    step it last began to save (saves are asynchronous: their errors surface later)."""
    status = {"saving": None}
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.acquire()
        try:
            yield status
        finally:
            if lock is not None:
                lock.release()
    except Exception as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        kept = complete_steps(workdir)
        what = (f"writing checkpoint step {status['saving']} (or logs and samples)" if status["saving"] is not None
                else "starting the run (writer lock, config.json, config history) or writing logs")
        raise DiskFullError(str(workdir), what, kept[-1] if kept else None) from e


def _resume(checkpointer: Checkpointer, workdir: str, abstract_state: Any, data: Any, record: dict,
            aside: str) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint that restores, with the data iterator set to its position. Newer
    steps that do not restore are moved, untouched, to WORKDIR/`aside` (logged with step, item and file, and
    recorded in the start's history record), so the manager no longer sees them."""
    state, data_state, restored, unreadable = checkpointer.restore_newest(abstract_state, checkpointer.all_steps())
    if unreadable:
        if jax.process_index() == 0:
            moved = move_steps_aside(workdir, sorted(unreadable), aside)
            logging.warning("resuming from step %d: the newer checkpoint steps %s do not restore and were moved, "
                            "untouched, to %s (%s)", restored, sorted(unreadable), moved,
                            "; ".join(f"step {s}: {why}" for s, why in unreadable.items()))
            record["unreadable"] = {"steps": sorted(unreadable), "to": moved}
        _sync("hd_unreadable_steps")
        checkpointer.reload()
    data.set_state(data_state)
    return state, restored


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _clear_restore_step(config: ml_collections.ConfigDict, workdir: str) -> None:
    """After a divergence, let the next start apply config.restore_step again, even the same value (it acts
    once per value recorded in config.json, so a rerun after a preemption does not go back)."""
    content = read_stored_config(workdir) if jax.process_index() == 0 and config.restore_step not in (0, -1) else None
    if content is None:
        return
    content["restore_step"] = 0
    replace_text(epath.Path(workdir) / "config.json", json.dumps(content, indent=2))

