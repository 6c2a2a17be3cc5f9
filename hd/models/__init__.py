"""Networks. One backbone serves teacher, student, fake score and feature extractor."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hd.models.dit import DIT_SIZES, DiT
from hd.models.mlp import MLP


def build_model(model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The velocity network named by `model_cfg.name` for examples of shape `data_shape`."""
    dtype = {"float32": "float32", "bfloat16": "bfloat16"}[model_cfg.dtype]
    if model_cfg.name == "dit":
        hidden, depth, heads = DIT_SIZES[model_cfg.size]
        return DiT(input_size=data_shape[0], in_channels=data_shape[-1], num_classes=num_classes,
                   patch_size=model_cfg.patch_size, hidden_size=hidden, depth=depth, num_heads=heads,
                   mlp_ratio=model_cfg.mlp_ratio, learn_sigma=model_cfg.learn_sigma,
                   time_scale=model_cfg.time_scale, dtype=dtype, remat=model_cfg.get("remat", False),
                   scan_blocks=model_cfg.get("scan_blocks", False), attention=model_cfg.get("attention", "plain"))
    if model_cfg.name == "mlp":
        return MLP(in_features=data_shape[-1], num_classes=num_classes, width=model_cfg.width,
                   depth=model_cfg.depth, time_scale=model_cfg.time_scale, dtype=dtype)
    raise ValueError(f"model.name={model_cfg.name!r} is not one of 'dit', 'mlp'")


def velocity_apply(model: nn.Module) -> Callable:
    """(params, z, t, y) -> instantaneous velocity (h = 0)."""
    return lambda params, z, t, y: model.apply({"params": params}, z, t, t * 0, y)


def average_velocity_apply(model: nn.Module) -> Callable:
    """(params, z, r, t, y) -> average velocity over [r, t]: the backbone conditioned on t and h = t - r.
    MeanFlow differentiates this network with jax.jvp, which fused attention kernels lack: it runs plain
    attention whatever model.attention says (same parameters and values)."""
    if getattr(model, "attention", "plain") != "plain":
        model = model.clone(attention="plain")
    return lambda params, z, r, t, y: model.apply({"params": params}, z, t, t - r, y)


def init_params(model: nn.Module, key: jax.Array, data_shape: tuple[int, ...]):
    """Freshly initialised parameters of a velocity network for examples of shape `data_shape`."""
    x = jnp.zeros((1, *data_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    return model.init(key, x, t, t, jnp.zeros((1,), jnp.int32))["params"]


def abstract_params(model: nn.Module, data_shape: tuple[int, ...]):
    """ShapeDtypeStructs of the parameters of `model` (the configured architecture): nothing is allocated."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), data_shape))


def model_depth(model_cfg: ml_collections.ConfigDict) -> int:
    """Number of blocks (DiT) or hidden layers (MLP): the range of `return_tokens_at`."""
    return model_cfg.depth if model_cfg.name == "mlp" else DIT_SIZES[model_cfg.size][1]
