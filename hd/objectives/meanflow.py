"""Stage 1, sketch: MeanFlow trajectory distillation (docs/method.md, stage 1).

The student u(z, r, t, y) predicts the average velocity over [r, t]. The MeanFlow identity
u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t), with the total derivative along the flow
(dz/dt = v, dt/dt = 1, dr/dt = 0), gives a regression target from one forward-mode JVP.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hd.flow import interpolate
from hd.objectives.flow_matching import drop_labels

# (params, z, r, t, y) -> average velocity over [r, t]
AverageVelocityApply = Callable[[dict, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# (z, t, y) -> instantaneous velocity (the teacher's, with guidance), no gradient needed
TargetVelocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sample_time_pairs(key: jax.Array, batch: int, *, mean: float, std: float, fraction_r_neq_t: float,
                      fraction_one_step: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(t, r) with t >= r from two logit-normal draws; only the first round(fraction_r_neq_t * batch) rows keep
    r != t, the rest have r = t. Of the r != t rows, the first round(fraction_one_step * batch) are the full jump
    (r, t) = (0, 1) that one-step sampling takes: logit-normal pairs almost never span it (P(t - r > 0.9) is about
    2e-5 at mean -0.4, std 1). Positional masks keep shapes static, and the batch is already shuffled."""
    draws = jax.nn.sigmoid(mean + std * jax.random.normal(key, (2, batch)))
    t, r = jnp.max(draws, axis=0), jnp.min(draws, axis=0)
    row = jnp.arange(batch)
    num_one_step = int(round(fraction_one_step * batch))
    t = jnp.where(row < num_one_step, 1.0, t)
    r = jnp.where(row < num_one_step, 0.0, r)
    num_distinct = int(round(fraction_r_neq_t * batch))
    r = jnp.where(row < num_distinct, r, t)
    return t, r


def meanflow_loss(apply_fn: AverageVelocityApply, params: dict, batch: dict[str, jax.Array], key: jax.Array, *,
                  target_velocity: TargetVelocity | None, null_label: int, label_dropout: float,
                  time_mean: float, time_std: float, fraction_r_neq_t: float, adaptive_p: float,
                  adaptive_c: float, fraction_one_step: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Adaptively weighted MeanFlow loss. `target_velocity=None` uses the conditional velocity eps - x
    (MeanFlow from scratch); otherwise the (teacher's) marginal velocity at (z_t, t, y)."""
    x, y = batch["x"], batch["y"]
    k_time, k_eps, k_label = jax.random.split(key, 3)
    t, r = sample_time_pairs(k_time, x.shape[0], mean=time_mean, std=time_std, fraction_r_neq_t=fraction_r_neq_t,
                             fraction_one_step=fraction_one_step)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    y = drop_labels(k_label, y, label_dropout, null_label)
    z = interpolate(x, eps, t)
    v = eps - x if target_velocity is None else jax.lax.stop_gradient(target_velocity(z, t, y))

    u, du_dt = jax.jvp(lambda z_, t_, r_: apply_fn(params, z_, r_, t_, y), (z, t, r),
                       (v, jnp.ones_like(t), jnp.zeros_like(r)))
    span = jnp.clip(t - r, 0.0, 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
    u_target = jax.lax.stop_gradient(v - span * du_dt)

    squared_error = jnp.sum((u - u_target) ** 2, axis=tuple(range(1, x.ndim)))
    weight = jax.lax.stop_gradient(1.0 / (squared_error + adaptive_c) ** adaptive_p)
    loss = jnp.mean(weight * squared_error)
    # The weighted loss sits near 1 whatever the fit; the raw error is what to watch.
    return loss, {"loss": loss, "mse": jnp.mean(squared_error), "mse_per_dim": jnp.mean(squared_error) / x[0].size}
