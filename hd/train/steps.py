"""One pure train step per stage. Each differentiates exactly one parameter tree and skips, inside the
compiled step, any update whose loss or gradient is not finite."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hd import flow
from hd.models import average_velocity_apply, velocity_apply
from hd.objectives.flow_matching import flow_matching_loss
from hd.objectives.meanflow import meanflow_loss
from hd.objectives.refine import discriminator_apply, refine_critic_loss, refine_generator_loss
from hd.sampling import one_step_generate
from hd.train.state import RefineState, TrainState, ema_update

LossFn = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """Randomness depends on (seed, step) only, so a resumed run draws what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def guarded_update(loss_fn: LossFn, params: Any, opt_state: Any, key: jax.Array,
                   optimizer: optax.GradientTransformation) -> tuple[Any, Any, jax.Array, dict[str, jax.Array]]:
    """One optimizer update of `params` (the only tree differentiated); when the loss or the gradient is not
    finite the old parameters and optimizer state are returned and `finite` is False."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), finite, dict(metrics, grad_norm=grad_norm)


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
    """EMA warm-up: early averages would otherwise be dominated by the initialisation."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def count_skips(state: Any, finite: jax.Array) -> dict[str, jax.Array]:
    skip = (~finite).astype(jnp.int32)
    return dict(step=state.step + 1, consecutive_skips=(state.consecutive_skips + 1) * skip,
                total_skips=state.total_skips + skip)


def apply_gradients(state: TrainState, loss_fn: LossFn, key: jax.Array, optimizer: optax.GradientTransformation,
                    ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
    params, opt_state, finite, metrics = guarded_update(loss_fn, state.params, state.opt_state, key, optimizer)
    ema = ema_update(state.ema_params, params, jnp.where(finite, ema_decay_at(state.step, ema_decay), 1.0))
    new_state = state.replace(params=params, opt_state=opt_state, ema_params=ema, **count_skips(state, finite))
    return new_state, dict(metrics, skipped=(~finite).astype(jnp.float32))


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
                             adaptive_c=cfg.adaptive_c, fraction_one_step=cfg.fraction_one_step)

    return apply_gradients(state, loss_fn, step_key(config.seed, state.step), optimizer, config.ema_decay)


def refine_step(state: RefineState, batch: dict[str, jax.Array], teacher_params: Any, *, model, head,
                optimizer, critic_optimizer, config, feature_block: int) -> tuple[RefineState, dict[str, jax.Array]]:
    """Every step updates the critic (fake score + head); every k-th step first updates the generator.
    Each update differentiates exactly one tree: the generator's, or the critic's. `feature_block` is the resolved
    block the head reads (hd.config.feature_block)."""
    cfg = config.refine
    k_gen, k_critic = jax.random.split(step_key(config.seed, state.step))
    velocity = velocity_apply(model)
    generator = functools.partial(one_step_generate, model)
    discriminate = None if cfg.gan_head == "none" else discriminator_apply(
        model, head, teacher_params, feature_net=cfg.feature_net, feature_block=feature_block)
    # The generator's update reads both scores and the critic as they stand, as constants.
    real_velocity = flow.guided_velocity(lambda z, t, c: velocity(teacher_params, z, t, c), config.data.num_classes,
                                         cfg.real_cfg_scale)
    fake_velocity = lambda z, t, c: velocity(state.critic_params["fake_score"], z, t, c)
    critic_now = None if discriminate is None else (
        lambda x, t, c: discriminate(state.critic_params, x, t, c, for_generator=True))

    def generator_loss(params, key):
        return refine_generator_loss(generator, params, batch, key, real_velocity=real_velocity,
                                     fake_velocity=fake_velocity, discriminator=critic_now, t_min=cfg.t_min,
                                     t_max=cfg.t_max, gan_weight=cfg.gan_weight_generator)

    def update_generator(_):
        params, opt_state, finite, metrics = guarded_update(generator_loss, state.params, state.opt_state, k_gen,
                                                            optimizer)
        return params, opt_state, finite, {f"generator/{k}": v for k, v in metrics.items()}

    metric_shapes = jax.eval_shape(update_generator, None)[3]

    def keep_generator(_):  # metrics of steps without a generator update are masked out by the loop
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        return state.params, state.opt_state, jnp.array(True), zeros

    generator_due = state.step % cfg.generator_every == 0
    gen_params, gen_opt_state, gen_finite, gen_metrics = jax.lax.cond(generator_due, update_generator,
                                                                      keep_generator, None)

    def critic_loss(critic_params, key):  # on samples of the generator after this step's update, if any
        return refine_critic_loss(velocity, discriminate, critic_params, batch, key,
                                  generator=functools.partial(generator, gen_params),
                                  null_label=config.data.num_classes, t_min=cfg.t_min, t_max=cfg.t_max,
                                  gan_weight=cfg.gan_weight_critic)

    critic_params, critic_opt_state, critic_finite, critic_metrics = guarded_update(
        critic_loss, state.critic_params, state.critic_opt_state, k_critic, critic_optimizer)
    critic_metrics = {f"critic/{k}": v for k, v in critic_metrics.items()}

    ema = ema_update(state.ema_params, gen_params,
                     jnp.where(generator_due & gen_finite,
                               ema_decay_at(state.step // cfg.generator_every, config.ema_decay), 1.0))
    finite = gen_finite & critic_finite
    new_state = state.replace(params=gen_params, opt_state=gen_opt_state, ema_params=ema, critic_params=critic_params,
                              critic_opt_state=critic_opt_state, **count_skips(state, finite))
    metrics = dict(gen_metrics, **critic_metrics, skipped=(~finite).astype(jnp.float32),
                   generator_updated=generator_due.astype(jnp.float32))
    return new_state, metrics
