"""Where the AWD head looks: its token weights over a fixed batch of generated samples, as heat maps.

The refine stage's discriminator sees samples noised to a level t_d (hd.objectives.refine.discriminator_noise_level): tokens of one
block of the feature network (the fake score or the teacher), per-token logits l_i and token weights a_i
(hd.models.heads). For a fixed batch, a fixed t and fixed noise, this module computes two weightings over the
token grid, each a softmax over tokens (summing to 1 per image, averaged over the heads):

  attention  a = softmax_i(q . W_k LN(h_i) / (sqrt(d_k) tau)), the head's learned query (AWD 'attention' heads);
  logit      a = softmax_i(-l_i / tau), most weight on the tokens the critic finds most fake (any head's logits).

and renders them beside the samples: [samples | attention overlay | logit overlay], each token's weight
repeated over its patch, one colour scale per panel (the panel's largest weight is white-hot).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hd import flow, visualize
from hd.checkpoint import read_ema_params, read_items, read_stored_config
from hd.config import feature_block as resolved_feature_block
from hd.models import abstract_params, build_model, init_params
from hd.models.heads import AWDHead, build_head, logit_weights

HEATMAP_T = 0.5  # noise level of the heat maps: the middle of the discriminator's t_d range [0.02, 0.98]


def token_weights(model: nn.Module, head: nn.Module, feature_params: Any, head_params: Any, samples: jax.Array,
                  labels: jax.Array, *, feature_block: int, t: float = HEATMAP_T, seed: int = 0
                  ) -> dict[str, jax.Array]:
    """Token weights [N, T] of `head` on `samples` [N, H, W, C] noised to `t` with noise from `seed`, as the
    discriminator sees them: {'attention': ... (AWD attention heads only), 'logit': ...}, each row summing to 1.
    Traceable: awd_token_weights jits it for a checkpoint, the refine stage (Stage.token_weights) for its live
    critic inside training, so the two heat maps of one state agree."""
    attention = isinstance(head, AWDHead) and head.weighting == "attention"
    temperature = head.temperature if isinstance(head, AWDHead) else 1.0
    samples, labels = jnp.asarray(samples, jnp.float32), jnp.asarray(labels, jnp.int32)
    t_vec = jnp.full((samples.shape[0],), t, jnp.float32)
    noised = flow.interpolate(samples, jax.random.normal(jax.random.PRNGKey(seed), samples.shape), t_vec)
    _, tokens = model.apply({"params": feature_params}, noised, t_vec, t_vec * 0, labels,
                            return_tokens_at=feature_block)
    logits, weights = head.apply({"params": head_params}, tokens, for_generator=False)
    out = {"logit": logit_weights(logits, temperature).mean(axis=-1)}
    if attention:
        out["attention"] = weights.mean(axis=-1)
    return out


def host_weights(weights: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """token_weights' output as numpy arrays, attention first: the order of the panels in awd_heatmap_grid."""
    return {name: np.asarray(weights[name]) for name in ("attention", "logit") if name in weights}


def awd_token_weights(model: nn.Module, head: nn.Module, feature_params: Any, head_params: Any, samples: jax.Array,
                      labels: jax.Array, *, feature_block: int, t: float = HEATMAP_T, seed: int = 0
                      ) -> dict[str, np.ndarray]:
    """token_weights in one compiled call (the model op by op is many times slower on a CPU), as numpy arrays."""
    weigh = jax.jit(functools.partial(token_weights, model, head, feature_block=feature_block, t=t, seed=seed))
    return host_weights(weigh(feature_params, head_params, samples, labels))


def awd_heatmap_grid(samples: np.ndarray, weights: dict[str, np.ndarray], rows: int, upscale: int = 3,
                     gap: int = 4) -> np.ndarray:
    """Samples [N, H, W, C] in [-1, 1] and token weights {name: [N, T]} -> one uint8 RGB image: the sample grid,
    then one grid of heat-map overlays per weighting, side by side (`gap` white pixels apart), each grid with
    `rows` rows and every image enlarged `upscale` times (nearest)."""
    samples = np.asarray(samples, np.float32)
    if samples.ndim != 4:
        raise ValueError(f"heat maps need images [N, H, W, C], got samples of shape {samples.shape}")
    grey = np.repeat(visualize.to_uint8(samples.mean(axis=-1, keepdims=True)), 3, axis=-1)
    panels = [visualize.image_grid(grey, rows, upscale=upscale)]
    for name, w in weights.items():
        if w.shape[0] != samples.shape[0]:
            raise ValueError(f"{name} weights are for {w.shape[0]} images, the samples are {samples.shape[0]}")
        heat = visualize.token_heatmaps(w, samples.shape[1:3])
        heat = heat / max(float(heat.max()), 1e-12)  # one scale per panel: images in a panel compare
        panels.append(visualize.image_grid(visualize.heatmap_overlay(samples, heat), rows, upscale=upscale))
    spacer = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, spacer)][:-1], axis=1)


def run_heatmap_grid(workdir: str, samples: np.ndarray, labels: np.ndarray, rows: int, upscale: int = 3,
                     t: float = HEATMAP_T, seed: int = 0) -> np.ndarray | None:
    """The heat-map image (awd_heatmap_grid) of the AWD head of the refine run in `workdir`, on `samples`
    (generated with `labels`), from its newest checkpoint; None when the run is not a refine stage with an
    AWD head (teacher and sketch rows, GAP/conv heads, no GAN)."""
    stored = read_stored_config(workdir)
    if stored is None:
        return None
    stored.pop("sources", None)  # not a config key
    config = ml_collections.ConfigDict(stored)
    if config.get("stage") != "refine" or config.refine.gan_head != "awd":
        return None
    cfg = config.refine
    data_shape = tuple(samples.shape[1:])
    model = build_model(config.model, data_shape, config.data.num_classes)
    head = build_head("awd", width=cfg.head_width, weighting=cfg.awd_weighting, num_heads=cfg.awd_heads,
                      temperature=cfg.awd_temperature)
    feature_block = resolved_feature_block(config)
    abstract = abstract_params(model, data_shape)

    def init_head():
        zeros = jnp.zeros((1, *data_shape))
        _, tokens = model.apply({"params": init_params(model, jax.random.PRNGKey(0), data_shape)}, zeros,
                                jnp.zeros((1,)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
                                return_tokens_at=feature_block)
        return head.init(jax.random.PRNGKey(0), tokens)["params"]

    critic = read_items(workdir, {"critic_params": {"fake_score": abstract, "head": jax.eval_shape(init_head)}}
                        )[0]["critic_params"]
    if cfg.feature_net == "fake_score":
        features = critic["fake_score"]
    else:  # LADD-style: the frozen teacher's tokens
        features = read_ema_params(model, data_shape, cfg.teacher_workdir)[0]
    weights = awd_token_weights(model, head, features, critic["head"], samples, labels, feature_block=feature_block,
                                t=t, seed=seed)
    return awd_heatmap_grid(samples, weights, rows, upscale=upscale)
