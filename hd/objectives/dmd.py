"""Stage 2, refine: distribution matching distillation (DMD2-style, docs/method.md, stage 2).

The generator's samples are pushed along the difference between what a "fake" score (trained on the
generator's own samples) and the frozen teacher (the real score) denoise them to: the reverse-KL gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hd.flow import data_from_velocity, interpolate

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (z, t, y) -> v


def dmd_generator_loss(x_g: jax.Array, y: jax.Array, key: jax.Array, *, real_velocity: VelocityFn,
                       fake_velocity: VelocityFn, t_min: float, t_max: float
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """0.5 * mean((x_g - sg(x_g - g))^2) whose gradient w.r.t. x_g is g / size, with
    g = (x_fake - x_real) / mean|x_g - x_real| (per sample). Both scores are constants here."""
    k_t, k_n = jax.random.split(key)
    t = jax.random.uniform(k_t, (x_g.shape[0],), minval=t_min, maxval=t_max)
    x_t = interpolate(x_g, jax.random.normal(k_n, x_g.shape, x_g.dtype), t)
    x_t = jax.lax.stop_gradient(x_t)
    x_real = jax.lax.stop_gradient(data_from_velocity(x_t, t, real_velocity(x_t, t, y)))
    x_fake = jax.lax.stop_gradient(data_from_velocity(x_t, t, fake_velocity(x_t, t, y)))
    axes = tuple(range(1, x_g.ndim))
    normaliser = jnp.mean(jnp.abs(jax.lax.stop_gradient(x_g) - x_real), axis=axes, keepdims=True)
    g = (x_fake - x_real) / jnp.maximum(normaliser, 1e-8)
    loss = 0.5 * jnp.mean((x_g - jax.lax.stop_gradient(x_g - g)) ** 2)
    return loss, {"dmd_loss": loss, "dmd_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(g ** 2, axis=axes)))}
