"""A small velocity MLP for 2-D data with the DiT call signature v(x, t, h, y)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hd.models.dit import TimestepEmbedder


class MLP(nn.Module):
    """x: [B, D] points. Conditioning (t, h, class) is embedded and added before every hidden layer;
    the h embedding's output layer starts at zero like the DiT's."""

    in_features: int = 2
    num_classes: int = 1
    width: int = 256
    depth: int = 4
    time_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array, y: jax.Array,
                 *, return_tokens_at: int | None = None):
        if return_tokens_at is not None and not 0 <= return_tokens_at < self.depth:
            raise ValueError(f"return_tokens_at={return_tokens_at} outside the {self.depth} layers")
        temb = lambda zero, name: TimestepEmbedder(self.width, frequency_size=64, scale=self.time_scale,
                                                   zero_output=zero, dtype=self.dtype, name=name)
        c = temb(False, "t_embedder")(t) + temb(True, "h_embedder")(h)
        c = c + nn.Embed(self.num_classes + 1, self.width, name="y_embedder")(y)
        hidden = nn.Dense(self.width, dtype=self.dtype, name="input")(x)
        picked = None
        for i in range(self.depth):
            hidden = nn.silu(nn.Dense(self.width, dtype=self.dtype, name=f"hidden_{i}")(hidden + c))
            if i == return_tokens_at:
                picked = hidden[:, None, :]  # one token per example
        out = nn.Dense(self.in_features, dtype=self.dtype, name="output")(hidden).astype(jnp.float32)
        return out if return_tokens_at is None else (out, picked)
