"""What the loop needs to know about a stage: how its state starts, its pure step, the frozen trees it reads
(e.g. the teacher in later stages) and how to draw samples for grids."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from hd import flow
from hd.models import build_model
from hd.train import steps
from hd.train.state import TrainState, make_optimizer


@dataclasses.dataclass
class Stage:
    name: str
    init_state: Callable[[jax.Array], Any]  # key -> fresh state (before any hand-off)
    step: Callable[[Any, dict, Any], tuple[Any, dict]]  # (state, batch, frozen) -> (state, metrics)
    sample: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]  # (state, frozen, noise, labels) -> x
    frozen: Any = None  # read-only trees the step and sampler take as inputs (never saved by this stage)
    sample_nfe: int = 1


def model_apply(model) -> Callable:
    """(params, z, t, h, y) -> v for a Flax velocity network."""
    return lambda params, z, t, h, y: model.apply({"params": params}, z, t, h, y)


def init_params(model, key: jax.Array, data_shape: tuple[int, ...]) -> Any:
    x = jnp.zeros((1, *data_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    return model.init(key, x, t, t, jnp.zeros((1,), jnp.int32))["params"]


def ode_sampler(apply_fn: Callable, config: ml_collections.ConfigDict, num_steps: int, method: str,
                cfg_scale: float) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, noise, labels) -> samples of the multi-step ODE sampler with CFG."""

    def sample(params, noise, labels):
        velocity = lambda z, t, y: apply_fn(params, z, t, jnp.zeros_like(t), y)
        guided = flow.guided_velocity(velocity, config.data.num_classes, cfg_scale)
        return flow.sample_ode(guided, noise, labels, num_steps=num_steps, method=method)

    return sample


def teacher_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    model = build_model(config.model, data_shape, config.data.num_classes)
    apply_fn = model_apply(model)
    optimizer = make_optimizer(config.optimizer, config.num_steps)
    sampler = ode_sampler(apply_fn, config, config.sample.num_steps, config.sample.method, config.sample.cfg_scale)
    return Stage(
        name="teacher",
        init_state=lambda key: TrainState.create(init_params(model, key, data_shape), optimizer),
        step=lambda state, batch, frozen: steps.teacher_step(state, batch, apply_fn=apply_fn, optimizer=optimizer,
                                                             config=config),
        sample=lambda state, frozen, noise, labels: sampler(state.ema_params, noise, labels),
        sample_nfe=flow.ode_nfe(config.sample.num_steps, config.sample.method),
    )


def build_stage(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Stage:
    builders = {"teacher": teacher_stage}
    if config.stage not in builders:
        raise ValueError(f"config.stage={config.stage!r} has no trainer yet; available: {sorted(builders)}")
    return builders[config.stage](config, data_shape)
