"""The flow-matching path and its samplers (docs/method.md, conventions).

t in [0, 1]; t = 0 is data, t = 1 is noise; z_t = (1 - t) x + t eps; the network predicts v = E[eps - x | z_t].
A "velocity function" here is any `fn(z, t, y) -> v` with t of shape [B]; `average_velocity_fn` is
`fn(z, r, t, y) -> u`, the mean velocity over [r, t].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
AverageVelocityFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    t = _bcast(t, x)
    return (1 - t) * x + t * eps


def data_from_velocity(z: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    return z - _bcast(t, z) * v


def noise_from_velocity(z: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    return z + (1 - _bcast(t, z)) * v


def guided_velocity(velocity: VelocityFn, null_label: int, scale: float | jax.Array,
                    interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
    """Classifier-free guidance v(., null) + w (v(., c) - v(., null)), with w applied only for t inside
    `interval` (1 outside). Both branches share one batched call."""

    def fn(z: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        if isinstance(scale, (int, float)) and scale == 1.0:
            return velocity(z, t, y)
        both = velocity(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                        jnp.concatenate([y, jnp.full_like(y, null_label)]))
        cond, uncond = jnp.split(both, 2)
        w = jnp.where((t >= interval[0]) & (t <= interval[1]), scale, 1.0)
        return uncond + _bcast(w, z) * (cond - uncond)

    return fn


def sample_ode(velocity: VelocityFn, noise: jax.Array, labels: jax.Array, *, num_steps: int,
               method: str = "euler") -> jax.Array:
    """Integrate dz/dt = v from t = 1 to t = 0 on a uniform grid. Heun uses 2 evaluations per step except
    the last (the standard EDM/SiT convention), so its NFE is 2 * num_steps - 1."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler method {method!r} is not one of 'euler', 'heun'")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    times = jnp.linspace(1.0, 0.0, num_steps + 1)
    batch = noise.shape[0]

    def euler(i, z):
        return z + (times[i + 1] - times[i]) * velocity(z, jnp.full((batch,), times[i]), labels)

    def heun(i, z):
        t, t_next = times[i], times[i + 1]
        v = velocity(z, jnp.full((batch,), t), labels)
        v_next = velocity(z + (t_next - t) * v, jnp.full((batch,), t_next), labels)
        return z + (t_next - t) * 0.5 * (v + v_next)

    z = jax.lax.fori_loop(0, num_steps - 1, euler if method == "euler" else heun, noise)
    return euler(num_steps - 1, z)


def ode_nfe(num_steps: int, method: str) -> int:
    return num_steps if method == "euler" else 2 * num_steps - 1


def sample_mean_flow(average_velocity: AverageVelocityFn, noise: jax.Array, labels: jax.Array, *,
                     num_steps: int = 1, times: jax.Array | None = None) -> jax.Array:
    """z_r = z_t - (t - r) u(z_t, r, t) along `times` (descending from 1 to 0; uniform by default).
    One step is x = eps - u(eps, 0, 1)."""
    if times is None:
        times = jnp.linspace(1.0, 0.0, num_steps + 1)
    batch = noise.shape[0]
    z = noise
    for i in range(times.shape[0] - 1):
        t, r = jnp.full((batch,), times[i]), jnp.full((batch,), times[i + 1])
        z = z - _bcast(t - r, z) * average_velocity(z, r, t, labels)
    return z
