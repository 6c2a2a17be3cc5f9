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
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt_state=optimizer.init(params), consecutive_skips=jnp.zeros((), jnp.int32),
                   total_skips=jnp.zeros((), jnp.int32))


def make_optimizer(opt_cfg: Any, frozen_prefixes: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """AdamW with linear warm-up to a constant rate, after global-norm clipping. Parameters whose top-level
    name starts with one of `frozen_prefixes` get zero updates (the teacher never trains its h-embedding,
    so the student copied from it still starts with that embedding's output at exactly zero)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt_cfg.lr, max(opt_cfg.warmup_steps, 1)), optax.constant_schedule(opt_cfg.lr)],
        [max(opt_cfg.warmup_steps, 1)])
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
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
