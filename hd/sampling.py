"""Model-bound samplers: a model and its settings in, `(params, noise, labels) -> samples` out.

The path conventions and integrators they run live in hd/flow.py; these bind them to a network's apply
function (hd.models: velocity_apply / average_velocity_apply), so that training grids, the refine step, the
evaluator and the benchmark draw samples the same way.
- `ode_sampler`: the multi-step ODE sampler with classifier-free guidance (teacher, its EMA, a fake score);
- `mean_flow_sampler`: k mean-flow jumps of a one-step generator (sketch, refine);
- `one_step_generate`: the one-step generator x = eps - u(eps, 0, 1, y) as a function of its parameters (the
  form the refine objective differentiates).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from hd import flow
from hd.models import average_velocity_apply, velocity_apply

Sampler = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, noise, labels) -> samples


def ode_sampler(model, num_classes: int, num_steps: int, method: str, cfg_scale: float | jax.Array) -> Sampler:
    """Samples of the multi-step ODE sampler ('euler' or 'heun', `num_steps` steps) with CFG scale `cfg_scale`
    (the null label is `num_classes`), for any parameters of `model`."""
    apply_fn = velocity_apply(model)

    def sample(params, noise, labels):
        velocity = lambda z, t, y: apply_fn(params, z, t, y)
        guided = flow.guided_velocity(velocity, num_classes, cfg_scale)
        return flow.sample_ode(guided, noise, labels, num_steps=num_steps, method=method)

    return sample


def mean_flow_sampler(model, num_steps: int) -> Sampler:
    """Samples after `num_steps` mean-flow jumps (1 = one network evaluation)."""
    apply_fn = average_velocity_apply(model)

    def sample(params, noise, labels):
        average_velocity = lambda z, r, t, y: apply_fn(params, z, r, t, y)
        return flow.sample_mean_flow(average_velocity, noise, labels, num_steps=num_steps)

    return sample


def one_step_generate(model, params: Any, noise: jax.Array, y: jax.Array) -> jax.Array:
    """x = eps - u(eps, r=0, t=1, y): the one-step generator of stages 1 and 2."""
    ones = jnp.ones((noise.shape[0],), noise.dtype)
    return noise - average_velocity_apply(model)(params, noise, ones * 0, ones, y)
