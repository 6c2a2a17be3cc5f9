"""What the loop needs to know about a stage: how its state starts, its pure step, the frozen trees it reads
(e.g. the teacher in later stages) and how to draw samples for grids."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from hd import flow
from hd.models import average_velocity_apply, build_model, init_params, model_depth, velocity_apply
from hd.models.heads import build_head
from hd.train import steps
from hd.checkpoint import describe_source, read_items
from hd.train.state import RefineState, TrainState, make_optimizer


@dataclasses.dataclass
class Stage:
    name: str
    init_state: Callable[[jax.Array], Any]  # key -> fresh state (before any hand-off)
    step: Callable[[Any, dict, Any], tuple[Any, dict]]  # (state, batch, frozen) -> (state, metrics)
    sample: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]  # (state, frozen, noise, labels) -> x
    frozen: Any = None  # read-only trees the step and sampler take as inputs (never saved by this stage)
    sample_nfe: int = 1


def ode_sampler(model, num_classes: int, num_steps: int, method: str, cfg_scale: float
                ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, noise, labels) -> samples of the multi-step ODE sampler with CFG, for any parameters
    (teacher, its EMA, a fake score)."""
    apply_fn = velocity_apply(model)

    def sample(params, noise, labels):
        velocity = lambda z, t, y: apply_fn(params, z, t, y)
        guided = flow.guided_velocity(velocity, num_classes, cfg_scale)
        return flow.sample_ode(guided, noise, labels, num_steps=num_steps, method=method)

    return sample


def teacher_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    model = build_model(config.model, data_shape, config.data.num_classes)
    optimizer = make_optimizer(config.optimizer, frozen_prefixes=("h_embedder",))  # h = 0 in this stage
    sampler = ode_sampler(model, config.data.num_classes, config.sample.num_steps, config.sample.method,
                          config.sample.cfg_scale)
    return Stage(
        name="teacher",
        init_state=lambda key: TrainState.create(init_params(model, key, data_shape), optimizer),
        step=lambda state, batch, frozen: steps.teacher_step(state, batch, model=model, optimizer=optimizer,
                                                             config=config),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        sample_nfe=flow.ode_nfe(config.sample.num_steps, config.sample.method),
    )


def mean_flow_sampler(model, num_steps: int) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, noise, labels) -> samples after `num_steps` mean-flow jumps (1 = one network evaluation)."""
    apply_fn = average_velocity_apply(model)

    def sample(params, noise, labels):
        average_velocity = lambda z, r, t, y: apply_fn(params, z, r, t, y)
        return flow.sample_mean_flow(average_velocity, noise, labels, num_steps=num_steps)

    return sample


def source_dirs(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """{role: (work directory, the stage it must hold)} of every earlier stage this stage reads."""
    if config.stage == "sketch" and (config.sketch.target == "teacher" or config.sketch.teacher_workdir):
        return {"teacher": (config.sketch.teacher_workdir, "teacher")}
    if config.stage == "refine":
        dirs = {"teacher": (config.refine.teacher_workdir, "teacher")}
        if config.refine.generator_init == "sketch":
            dirs["sketch"] = (config.refine.sketch_workdir, "sketch")
        return dirs
    return {}


def hand_off_sources(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """{role: {workdir, stage, step, num_steps}} of what this stage's hand-offs read, checked without reading
    any array (config.json present, the right stage, finished unless config.allow_unfinished_sources): what the
    loop records under `sources` in config.json."""
    return {role: describe_source(workdir, role, stage, allow_unfinished=config.allow_unfinished_sources)
            for role, (workdir, stage) in source_dirs(config).items()}


def load_ema_params(model, data_shape: tuple[int, ...], workdir: str, *, role: str = "teacher",
                    stage: str = "teacher", allow_unfinished: bool = False) -> Any:
    """The EMA parameters of another stage's newest checkpoint: the directory is checked first (describe_source:
    its config.json, its stage, finished), then the stored tree against the configured architecture, before
    any array is read. Logs the directory, stage and step it read."""
    # The loop has logged an allowed unfinished source already (hand_off_sources); this line says which step.
    source = describe_source(workdir, role, stage, allow_unfinished=allow_unfinished, warn=False)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), data_shape))
    items, step = read_items(workdir, {"ema_params": abstract}, step=source["step"])
    unfinished = ", unfinished" if step < source["num_steps"] else ""
    logging.info("hand-off: %s = ema_params of %s (stage %s, step %d of %d%s%s)", role, workdir, source["stage"],
                 step, source["num_steps"], ", imported" if "imported_from" in source else "", unfinished)
    return items["ema_params"]


def load_teacher(model, data_shape: tuple[int, ...], workdir: str, *, allow_unfinished: bool = False) -> Any:
    """The teacher's EMA parameters from the newest checkpoint of a finished teacher stage's work directory."""
    return load_ema_params(model, data_shape, workdir, allow_unfinished=allow_unfinished)


def student_from_teacher(teacher_params: Any) -> Any:
    """A copy of the teacher with the h-embedding's output layer at zero: at r = t it is the teacher."""
    params = jax.tree.map(jnp.array, teacher_params)
    params["h_embedder"]["mlp_2"] = jax.tree.map(jnp.zeros_like, params["h_embedder"]["mlp_2"])
    return params


def sketch_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    model = build_model(config.model, data_shape, config.data.num_classes)
    # MeanFlow from data alone (target 'data') may start from scratch when no teacher is named.
    teacher_params = None
    if config.sketch.target == "teacher" or config.sketch.teacher_workdir:
        teacher_params = load_teacher(model, data_shape, config.sketch.teacher_workdir,
                                      allow_unfinished=config.allow_unfinished_sources)
    return sketch_stage_from(config, data_shape, teacher_params)


def sketch_stage_from(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], teacher_params: Any) -> Stage:
    """The sketch stage around given teacher parameters (a checkpoint's, random ones for benchmarks, or
    ShapeDtypeStructs for compile checks); None = a student from scratch and no frozen tree (target 'data')."""
    model = build_model(config.model, data_shape, config.data.num_classes)
    optimizer = make_optimizer(config.optimizer)
    sampler = mean_flow_sampler(model, config.sample.num_steps)

    def init_state(key):
        params = init_params(model, key, data_shape) if teacher_params is None else student_from_teacher(teacher_params)
        return TrainState.create(params, optimizer)

    return Stage(
        name="sketch",
        init_state=init_state,
        step=lambda state, batch, teacher: steps.sketch_step(
            state, batch, teacher, model=model, optimizer=optimizer, config=config),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        frozen=teacher_params,
        sample_nfe=config.sample.num_steps,
    )


def refine_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    """Generator from the sketch's EMA (or the teacher: the no-sketch baseline); real and fake score from the
    teacher's EMA."""
    cfg = config.refine
    model = build_model(config.model, data_shape, config.data.num_classes)
    teacher_params = load_teacher(model, data_shape, cfg.teacher_workdir,
                                  allow_unfinished=config.allow_unfinished_sources)
    if cfg.generator_init == "sketch":
        generator = load_ema_params(model, data_shape, cfg.sketch_workdir, role="sketch", stage="sketch",
                                    allow_unfinished=config.allow_unfinished_sources)
    else:
        generator = student_from_teacher(teacher_params)
    return refine_stage_from(config, data_shape, teacher_params, generator)


def refine_stage_from(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], teacher_params: Any,
                      generator: Any) -> Stage:
    """The refine stage around given teacher and generator parameters (checkpoints, or random for benchmarks)."""
    cfg = config.refine
    model = build_model(config.model, data_shape, config.data.num_classes)
    feature_block = model_depth(config.model) // 2 if cfg.feature_block == -1 else cfg.feature_block
    config = copy_with(config, {"refine.feature_block": feature_block})
    head = None if cfg.gan_head == "none" else build_head(
        cfg.gan_head, width=cfg.head_width,
        **(dict(weighting=cfg.awd_weighting, num_heads=cfg.awd_heads, temperature=cfg.awd_temperature)
           if cfg.gan_head == "awd" else {}))
    optimizer = make_optimizer(config.optimizer)
    critic_optimizer = make_optimizer(copy_with(config.optimizer, {"lr": cfg.critic_lr}))
    sampler = mean_flow_sampler(model, config.sample.num_steps)

    def init_state(key):
        critic = {"fake_score": jax.tree.map(jnp.array, teacher_params)}
        if head is not None:
            x = jnp.zeros((1, *data_shape))
            t = jnp.zeros((1,))
            _, tokens = model.apply({"params": teacher_params}, x, t, t, jnp.zeros((1,), jnp.int32),
                                    return_tokens_at=feature_block)
            critic["head"] = head.init(key, tokens)["params"]
        return RefineState.create(jax.tree.map(jnp.array, generator), critic, optimizer, critic_optimizer)

    return Stage(
        name="refine",
        init_state=init_state,
        step=lambda state, batch, teacher: steps.refine_step(
            state, batch, teacher, model=model, head=head, optimizer=optimizer, critic_optimizer=critic_optimizer,
            config=config),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        frozen=teacher_params,
        sample_nfe=config.sample.num_steps,
    )


def copy_with(config: ml_collections.ConfigDict, updates: dict[str, Any]) -> ml_collections.ConfigDict:
    """An unlocked copy of `config` with dotted keys replaced (derived values the stage fills in)."""
    out = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def abstract_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], key: jax.Array | None = None
                   ) -> tuple[Stage, Any]:
    """(stage, abstract state) without any checkpoint or array: the teacher and generator trees the stage would
    load are ShapeDtypeStructs of the configured architecture, and the state is traced with `jax.eval_shape`
    with them as inputs. The stage's `step` and `frozen` are what `build_stage` gives (the step can be lowered
    and compiled ahead of time, e.g. for a TPU slice); its `init_state` only works under tracing."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    if config.stage == "teacher":
        stage = teacher_stage(config, data_shape)
        return stage, jax.eval_shape(stage.init_state, key)
    model = build_model(config.model, data_shape, config.data.num_classes)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), data_shape))
    if config.stage == "sketch":
        teacher = params if (config.sketch.target == "teacher" or config.sketch.teacher_workdir) else None
        state = jax.eval_shape(lambda t, k: sketch_stage_from(config, data_shape, t).init_state(k), teacher, key)
        return sketch_stage_from(config, data_shape, teacher), state
    if config.stage == "refine":
        state = jax.eval_shape(lambda t, g, k: refine_stage_from(config, data_shape, t, g).init_state(k),
                               params, params, key)
        return refine_stage_from(config, data_shape, params, params), state
    raise ValueError(f"config.stage={config.stage!r} has no trainer; available: teacher, sketch, refine")


def build_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    builders = {"teacher": teacher_stage, "sketch": sketch_stage, "refine": refine_stage}
    if config.stage not in builders:
        raise ValueError(f"config.stage={config.stage!r} has no trainer yet; available: {sorted(builders)}")
    return builders[config.stage](config, data_shape)
