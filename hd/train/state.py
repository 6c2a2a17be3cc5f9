"""Train state: everything a step changes, and therefore everything a checkpoint holds."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    consecutive_skips: jax.Array  # non-finite updates in a row
    total_skips: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                   opt_state=optimizer.init(params), consecutive_skips=jnp.zeros((), jnp.int32),
                   total_skips=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class RefineState:
    """Generator (params, its EMA and optimizer) and critic (fake score + discriminator head, its optimizer).
    The generator fields keep the TrainState names so evaluation and hand-off read any stage alike."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    critic_params: Any  # {'fake_score': ..., 'head': ...}
    critic_opt_state: Any
    consecutive_skips: jax.Array
    total_skips: jax.Array

    @classmethod
    def create(cls, generator: Any, critic: Any, optimizer: optax.GradientTransformation,
               critic_optimizer: optax.GradientTransformation) -> "RefineState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=generator, ema_params=jax.tree.map(jnp.copy, generator), opt_state=optimizer.init(generator),
                   critic_params=critic, critic_opt_state=critic_optimizer.init(critic), consecutive_skips=zero,
                   total_skips=zero)


def make_optimizer(opt_cfg: Any, frozen_prefixes: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """AdamW with linear warm-up to a constant rate, after global-norm clipping. Parameters whose top-level
    name starts with one of `frozen_prefixes` get zero updates (the teacher never trains its h-embedding,
    so the student copied from it still starts with that embedding's output at exactly zero)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps), optax.constant_schedule(opt_cfg.lr)],
        [opt_cfg.warmup_steps]) if opt_cfg.warmup_steps > 0 else optax.constant_schedule(opt_cfg.lr)
    train = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip) if opt_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay),
    )
    if not frozen_prefixes:
        return train
    labels = lambda params: {k: jax.tree.map(lambda _: "frozen" if k.startswith(frozen_prefixes) else "train", v)
                             for k, v in params.items()}
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    # Written as an increment so a parameter that did not move (or decay = 1) leaves its EMA bit-identical.
    return jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), ema, params)
