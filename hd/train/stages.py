"""What the loop needs to know about a stage: how its state starts, its pure step, the frozen trees it reads
(e.g. the teacher in later stages) and how to draw samples for grids.

One builder per stage (`teacher_stage`, `sketch_stage`, `refine_stage`) takes the stage's frozen trees as
arguments; `stage_trees` supplies them from the checkpoints of earlier stages (training), as abstract shapes
(compile checks) or as random initialisations (benchmarks), and `build_stage` puts the two together."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from hd import flow
from hd.checkpoint import describe_source, read_ema_params
from hd.config import critic_optimizer, feature_block
from hd.eval import heatmaps
from hd.models import abstract_params, build_model, init_params
from hd.models.heads import build_head
from hd.sampling import mean_flow_sampler, ode_sampler
from hd.train import steps
from hd.train.state import RefineState, TrainState, make_optimizer


@dataclasses.dataclass
class Stage:
    name: str
    init_state: Callable[[jax.Array], Any]  # key -> fresh state (before any hand-off)
    step: Callable[[Any, dict, Any], tuple[Any, dict]]  # (state, batch, frozen) -> (state, metrics)
    sample: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]  # (state, frozen, noise, labels) -> x
    frozen: Any = None  # read-only trees the step and sampler take as inputs (never saved by this stage)
    sample_nfe: int = 1
    # (state, frozen, samples, labels) -> {'attention'?, 'logit'}: [N, T] token weights of the stage's AWD head
    # on image samples (hd.eval.heatmaps.token_weights), for heat maps beside the sample grids; None without one.
    token_weights: Callable[[Any, Any, jax.Array, jax.Array], dict[str, jax.Array]] | None = None


def teacher_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    """The flow-matching teacher: no frozen trees."""
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


def sketch_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], teacher: Any = None) -> Stage:
    """MeanFlow distillation of `teacher` (parameters, or ShapeDtypeStructs for compile checks) into a student
    that starts as the teacher; teacher=None: a student from scratch and no frozen tree (target 'data')."""
    model = build_model(config.model, data_shape, config.data.num_classes)
    optimizer = make_optimizer(config.optimizer)
    sampler = mean_flow_sampler(model, config.sample.num_steps)

    def init_state(key):
        params = init_params(model, key, data_shape) if teacher is None else student_from_teacher(teacher)
        return TrainState.create(params, optimizer)

    return Stage(
        name="sketch",
        init_state=init_state,
        step=lambda state, batch, frozen: steps.sketch_step(
            state, batch, frozen, model=model, optimizer=optimizer, config=config),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        frozen=teacher,
        sample_nfe=config.sample.num_steps,
    )


def refine_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], teacher: Any, generator: Any
                 ) -> Stage:
    """DMD with an adversarial head: the generator starts from `generator` (the sketch's EMA, or the teacher for
    the no-sketch baseline), real and fake score from `teacher`."""
    cfg = config.refine
    model = build_model(config.model, data_shape, config.data.num_classes)
    block = feature_block(config)
    head = None if cfg.gan_head == "none" else build_head(
        cfg.gan_head, width=cfg.head_width,
        **(dict(weighting=cfg.awd_weighting, num_heads=cfg.awd_heads, temperature=cfg.awd_temperature)
           if cfg.gan_head == "awd" else {}))
    optimizer = make_optimizer(config.optimizer)
    critic_opt = make_optimizer(critic_optimizer(config))
    sampler = mean_flow_sampler(model, config.sample.num_steps)

    def init_state(key):
        critic = {"fake_score": jax.tree.map(jnp.array, teacher)}
        if head is not None:
            x = jnp.zeros((1, *data_shape))
            t = jnp.zeros((1,))
            _, tokens = model.apply({"params": teacher}, x, t, t, jnp.zeros((1,), jnp.int32), return_tokens_at=block)
            critic["head"] = head.init(key, tokens)["params"]
        return RefineState.create(jax.tree.map(jnp.array, generator), critic, optimizer, critic_opt)

    def token_weights(state, frozen, samples, labels):  # the live critic: features as the step reads them
        features = state.critic_params["fake_score"] if cfg.feature_net == "fake_score" else frozen
        return heatmaps.token_weights(model, head, features, state.critic_params["head"], samples, labels,
                                      feature_block=block)

    return Stage(
        name="refine",
        init_state=init_state,
        step=lambda state, batch, frozen: steps.refine_step(
            state, batch, frozen, model=model, head=head, optimizer=optimizer, critic_optimizer=critic_opt,
            config=config, feature_block=block),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        frozen=teacher,
        sample_nfe=config.sample.num_steps,
        # Heat maps are drawn over images, for the AWD head only (as the evaluation's, run_heatmap_grid).
        token_weights=token_weights if cfg.gan_head == "awd" and len(data_shape) == 3 else None,
    )


BUILDERS: dict[str, Callable[..., Stage]] = {"teacher": teacher_stage, "sketch": sketch_stage,
                                             "refine": refine_stage}
TREE_SOURCES = ("checkpoints", "abstract", "random")


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
    params, step = read_ema_params(model, data_shape, workdir, step=source["step"])
    unfinished = ", unfinished" if step < source["num_steps"] else ""
    logging.info("hand-off: %s = ema_params of %s (stage %s, step %d of %d%s%s)", role, workdir, source["stage"],
                 step, source["num_steps"], ", imported" if "imported_from" in source else "", unfinished)
    return params


def student_from_teacher(teacher_params: Any) -> Any:
    """A copy of the teacher with the h-embedding's output layer at zero: at r = t it is the teacher."""
    params = jax.tree.map(jnp.array, teacher_params)
    params["h_embedder"]["mlp_2"] = jax.tree.map(jnp.zeros_like, params["h_embedder"]["mlp_2"])
    return params


def stage_trees(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], source: str = "checkpoints", *,
                stage: str | None = None) -> dict[str, Any]:
    """The frozen trees the builder of `stage` (default config.stage) takes, as keyword arguments:
    - 'checkpoints': the EMA parameters of the earlier stages the config names (load_ema_params: provenance
      checked and logged); only for config.stage, whose work directories the config names;
    - 'abstract': ShapeDtypeStructs of the configured architecture (no checkpoint, no array);
    - 'random': a random teacher (key seed + 1) and the student made from it as generator (benchmarks).
    A sketch that reads no teacher (target 'data', no teacher_workdir) gets teacher=None from every source."""
    stage = config.stage if stage is None else stage
    if source not in TREE_SOURCES:
        raise ValueError(f"stage_trees: source={source!r} is not one of {TREE_SOURCES}")
    if source == "checkpoints" and stage != config.stage:
        raise ValueError(f"stage_trees: checkpoints are read for config.stage={config.stage!r}, not {stage!r}")
    if stage == "teacher":
        return {}
    if stage == "sketch" and not (config.sketch.target == "teacher" or config.sketch.teacher_workdir):
        return {"teacher": None}  # MeanFlow from data alone
    model = build_model(config.model, data_shape, config.data.num_classes)
    if source == "abstract":
        teacher = abstract_params(model, data_shape)
    elif source == "random":
        teacher = jax.jit(lambda key: init_params(model, key, data_shape))(jax.random.PRNGKey(config.seed + 1))
    else:
        workdir = config.sketch.teacher_workdir if stage == "sketch" else config.refine.teacher_workdir
        teacher = load_ema_params(model, data_shape, workdir, allow_unfinished=config.allow_unfinished_sources)
    if stage == "sketch":
        return {"teacher": teacher}
    if source == "abstract":
        generator = teacher  # the same shapes
    elif source == "checkpoints" and config.refine.generator_init == "sketch":
        generator = load_ema_params(model, data_shape, config.refine.sketch_workdir, role="sketch", stage="sketch",
                                    allow_unfinished=config.allow_unfinished_sources)
    else:
        # Under jit: a copy with buffers of its own (a donating step rejects buffers shared with the teacher).
        generator = jax.jit(student_from_teacher)(teacher) if source == "random" else student_from_teacher(teacher)
    return {"teacher": teacher, "generator": generator}


def build_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], trees: dict[str, Any] | None = None,
                *, stage: str | None = None) -> Stage:
    """The builder of `stage` (default config.stage) around `trees` (default: stage_trees from checkpoints)."""
    stage = config.stage if stage is None else stage
    if stage not in BUILDERS:
        raise ValueError(f"config.stage={stage!r} has no trainer yet; available: {sorted(BUILDERS)}")
    trees = stage_trees(config, data_shape, stage=stage) if trees is None else trees
    return BUILDERS[stage](config, data_shape, **trees)


def initial_state(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], trees: dict[str, Any],
                  key: jax.Array, *, stage: str | None = None, abstract: bool = False) -> Any:
    """The fresh state of `stage` built around `trees`, which enter as arguments (not closed over) so that
    abstract trees can be traced: abstract=True gives ShapeDtypeStructs (jax.eval_shape), else arrays made
    under jit (TrainState.create alone would share buffers between params and ema_params, which a donating
    step rejects)."""
    init = lambda t, k: build_stage(config, data_shape, t, stage=stage).init_state(k)
    return jax.eval_shape(init, trees, key) if abstract else jax.jit(init)(trees, key)


def abstract_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], key: jax.Array | None = None
                   ) -> tuple[Stage, Any]:
    """(stage, abstract state) without any checkpoint or array: the stage is built around abstract trees
    (stage_trees 'abstract'), so its step can be lowered and compiled ahead of time (e.g. for a TPU slice);
    its `init_state` only works under tracing."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    if config.stage not in BUILDERS:
        raise ValueError(f"config.stage={config.stage!r} has no trainer; available: teacher, sketch, refine")
    trees = stage_trees(config, data_shape, "abstract")
    return build_stage(config, data_shape, trees), initial_state(config, data_shape, trees, key, abstract=True)
