"""One pure train step per stage. Each differentiates exactly one parameter tree and skips, inside the
compiled step, any update whose loss or gradient is not finite."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hd import flow
from hd.models import average_velocity_apply, velocity_apply
from hd.objectives.flow_matching import flow_matching_loss
from hd.objectives.meanflow import meanflow_loss
from hd.train.state import TrainState, ema_update

LossFn = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """Randomness depends on (seed, step) only, so a resumed run draws what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def apply_gradients(state: TrainState, loss_fn: LossFn, key: jax.Array, optimizer: optax.GradientTransformation,
                    ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up: early averages would otherwise be dominated by the random initialisation.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = ema_update(state.ema_params, params, decay)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skip = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        consecutive_skips=(state.consecutive_skips + 1) * skip, total_skips=state.total_skips + skip)
    metrics = dict(metrics, grad_norm=grad_norm, skipped=skip.astype(jnp.float32))
    return new_state, metrics


def teacher_step(state: TrainState, batch: dict[str, jax.Array], *, model, optimizer, config
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    def loss_fn(params, key):
        return flow_matching_loss(velocity_apply(model), params, batch, key, null_label=config.data.num_classes,
                                  label_dropout=config.teacher.label_dropout,
                                  time_sampling=config.teacher.time_sampling)

    return apply_gradients(state, loss_fn, step_key(config.seed, state.step), optimizer, config.ema_decay)


def sketch_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any, *, model, optimizer, config
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """MeanFlow update of the student; the teacher's parameters are an input, never differentiated."""
    cfg = config.sketch
    target = None
    if cfg.target == "teacher":
        teacher = lambda z, t, y: velocity_apply(model)(teacher_params, z, t, y)
        target = flow.guided_velocity(teacher, config.data.num_classes, cfg.cfg_scale, (cfg.cfg_t_min, cfg.cfg_t_max))
    student = average_velocity_apply(model)

    def loss_fn(params, key):
        return meanflow_loss(student, params, batch, key, target_velocity=target, null_label=config.data.num_classes,
                             label_dropout=cfg.label_dropout, time_mean=cfg.time_mean, time_std=cfg.time_std,
                             fraction_r_neq_t=cfg.fraction_r_neq_t, adaptive_p=cfg.adaptive_p,
                             adaptive_c=cfg.adaptive_c)

    return apply_gradients(state, loss_fn, step_key(config.seed, state.step), optimizer, config.ema_decay)
