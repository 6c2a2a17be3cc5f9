"""Stage 0: the teacher's flow-matching loss (docs/method.md, stage 0)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hd.flow import interpolate

# (params, z, t, y) -> velocity
VelocityApply = Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]


def sample_times(key: jax.Array, batch: int, method: str) -> jax.Array:
    if method == "uniform":
        return jax.random.uniform(key, (batch,))
    if method == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (batch,)))
    raise ValueError(f"time sampling {method!r} is not 'uniform' or 'logit_normal'")


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, null_label: int) -> jax.Array:
    """Replace a `rate` share of labels by the null class so one network learns both CFG branches."""
    return jnp.where(jax.random.uniform(key, labels.shape) < rate, null_label, labels)


def flow_matching_loss(apply_fn: VelocityApply, params: dict, batch: dict[str, jax.Array], key: jax.Array, *,
                       null_label: int, label_dropout: float, time_sampling: str = "uniform"
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the batch of ||v(z_t, t, y) - (eps - x)||^2, summed over features."""
    x, y = batch["x"], batch["y"]
    k_t, k_eps, k_y = jax.random.split(key, 3)
    t = sample_times(k_t, x.shape[0], time_sampling)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    y = drop_labels(k_y, y, label_dropout, null_label)
    v = apply_fn(params, interpolate(x, eps, t), t, y)
    per_example = jnp.sum((v - (eps - x)) ** 2, axis=tuple(range(1, x.ndim)))
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "mse_per_dim": loss / x[0].size}
