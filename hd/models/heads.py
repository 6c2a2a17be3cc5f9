"""Discriminator heads on feature-network tokens [B, N, D] (docs/method.md, the AWD head).

Every head returns per-token logits l [B, N, H] and token weights a [B, N, H] (summing to 1 over tokens) for
H heads; the discriminator output is D = mean_h sum_i a_ih l_ih. Returning both keeps the weighting
inspectable (entropy metric, tests).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class TokenLogits(nn.Module):
    """l_i = MLP(LN(h_i)), one logit per token and head."""

    num_heads: int = 1
    width: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.LayerNorm(name="norm")(tokens)
        x = nn.silu(nn.Dense(self.width, name="fc1")(x))
        return nn.Dense(self.num_heads, name="fc2")(x)  # [B, N, heads]


class GAPHead(nn.Module):
    """Global average pooling of per-token logits (the baseline AWD must beat)."""

    width: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array, *, for_generator: bool = False) -> tuple[jax.Array, jax.Array]:
        logits = TokenLogits(1, self.width, name="logits")(tokens)
        return logits, jnp.full(logits.shape, 1.0 / logits.shape[1])


class ConvHead(nn.Module):
    """A small conv net over the token grid (tokens reshaped to sqrt(N) x sqrt(N)), averaged."""

    width: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array, *, for_generator: bool = False) -> tuple[jax.Array, jax.Array]:
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"conv head needs a square token grid, got {n} tokens")
        x = nn.LayerNorm(name="norm")(tokens).reshape(b, side, side, d)
        x = nn.silu(nn.Conv(self.width, (3, 3), padding="SAME", name="conv1")(x))
        logits = nn.Conv(1, (1, 1), name="conv2")(x).reshape(b, n, 1)
        return logits, jnp.full(logits.shape, 1.0 / n)


class AWDHead(nn.Module):
    """Adaptive Weighted Discriminator (ours; the paper states only the idea).

    weighting='attention': a = softmax_i(q . W_k LN(h_i) / (sqrt(d_k) tau)) per head with a learned query q that
    starts at zero, so the head starts as global average pooling and learns where to look.
    weighting='logit': on the generator side, a = softmax_i(-l_i / tau) (no gradient through a): the generator is
    pushed hardest on the tokens that look most fake; the critic itself pools uniformly.
    """

    weighting: str = "attention"
    num_heads: int = 1
    key_size: int = 64
    temperature: float = 1.0
    width: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array, *, for_generator: bool = False) -> tuple[jax.Array, jax.Array]:
        logits = TokenLogits(self.num_heads, self.width, name="logits")(tokens)  # [B, N, H]
        if self.weighting == "attention":
            keys = nn.Dense(self.num_heads * self.key_size, use_bias=False, name="key")(
                nn.LayerNorm(name="key_norm")(tokens)).reshape(*tokens.shape[:2], self.num_heads, self.key_size)
            query = self.param("query", nn.initializers.zeros, (self.num_heads, self.key_size))
            scores = jnp.einsum("bnhk,hk->bnh", keys, query) / (math.sqrt(self.key_size) * self.temperature)
            weights = jax.nn.softmax(scores, axis=1)
        elif self.weighting == "logit":
            uniform = jnp.full(logits.shape, 1.0 / logits.shape[1])
            weights = logit_weights(logits, self.temperature) if for_generator else uniform
        else:
            raise ValueError(f"AWD weighting {self.weighting!r} is not 'attention' or 'logit'")
        return logits, weights


def logit_weights(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """The 'logit' weighting a = softmax_i(-l_i / tau) over tokens (axis 1), no gradient through a: most weight
    on the tokens that look most fake. Also what the heat maps (hd.eval.heatmaps) show for any head's logits."""
    return jax.nn.softmax(-jax.lax.stop_gradient(logits) / temperature, axis=1)


def discriminator_output(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """D(x) = mean_h sum_i a_ih l_ih, [B]; heads are averaged so D keeps a single head's scale."""
    return jnp.mean(jnp.sum(logits * weights, axis=1), axis=-1)


def weight_entropy(weights: jax.Array) -> jax.Array:
    """Entropy of the token weights divided by log N: 1 = uniform pooling, 0 = all weight on one token."""
    n = weights.shape[1]
    if n == 1:  # a single token is uniform pooling
        return jnp.ones(())
    entropy = -jnp.sum(weights * jnp.log(jnp.clip(weights, 1e-12)), axis=1)
    return jnp.mean(entropy) / jnp.log(n)


def build_head(kind: str, **kwargs) -> nn.Module:
    heads = {"awd": AWDHead, "gap": GAPHead, "conv": ConvHead}
    if kind not in heads:
        raise ValueError(f"discriminator head {kind!r} is not one of {sorted(heads)} (or 'none')")
    return heads[kind](**kwargs)
