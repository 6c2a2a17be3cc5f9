"""DiT/SiT backbone conditioned on (t, h = t - r, class).

The module and parameter names follow the official DiT/SiT PyTorch code (x_embedder, t_embedder.mlp,
y_embedder.embedding_table, blocks.N.{norm1,attn,norm2,mlp,adaLN_modulation}, final_layer) so official
checkpoints map onto it one-to-one. The extra `h_embedder` has the same structure as `t_embedder` with its
output layer at zero, so a network without it and one with it compute the same function at initialisation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid_size**2, embed_dim], row-major like the official DiT."""
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be a multiple of 4 for 2-D sin-cos positions")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # official code puts w first

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed_1d(grid_w), embed_1d(grid_h)], axis=1).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of a scalar per example, [B] -> [B, dim] (cos first, as in DiT)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# The official init treats the patch kernel as a [hidden, p*p*C] matrix (xavier-uniform over the flattened patch):
# fan_in = p*p*C, fan_out = hidden. Flax's conv xavier would multiply fan_out by p*p too (half the scale at p=2).
PATCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


class TimestepEmbedder(nn.Module):
    hidden_size: int
    frequency_size: int = 256
    scale: float = 1.0  # SiT feeds t in [0, 1] unscaled
    zero_output: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_frequencies(t * self.scale, self.frequency_size)
        x = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                     name="mlp_0")(freq)
        x = nn.silu(x)
        out_init = nn.initializers.zeros if self.zero_output else nn.initializers.normal(0.02)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=out_init, name="mlp_2")(x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax attention over [B, N, H, D]; written out so `jax.jvp` differentiates it
    (fused attention kernels often lack forward-mode rules).

    softmax(q k^T / sqrt(D)) v with the scale applied to q and the softmax's division after the product with v:
    both on [B, N, H, D] instead of the [B, H, N, N] logits and weights, which XLA:CPU otherwise materialises as
    broadcasts and copies around its matmul fusions (hd.tools.profile_step). Equal to the textbook form within
    float32 rounding (a few 1e-6 relative); the teacher step was 4-6 % faster in A/B runs on the CPU (README,
    Benchmark)."""
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    # exp(logits - max) as jax.nn.softmax computes it (no gradient through the max: it cancels in the ratio).
    unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    total = unnormalized.sum(axis=-1).transpose(0, 2, 1)[..., None]  # [B, N(q), H, 1]
    out = jnp.einsum("bhqk,bkhd->bqhd", unnormalized.astype(v.dtype), v)
    return (out.astype(jnp.float32) / total).astype(v.dtype)


ATTENTION_KINDS = ("plain", "fused")


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` over [B, N, H, D]: cuDNN's fused kernel on GPUs for bfloat16/float16
    (the only dtypes it takes), XLA's own implementation elsewhere. The cuDNN kernel has a custom VJP and no
    forward-mode rule, so no `jax.jvp` may pass through it (see DiT.attention)."""
    on_gpu = jax.default_backend() in ("gpu", "cuda") and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if on_gpu else "xla")


class Attention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    kind: str = "plain"  # plain | fused (see DiT.attention)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                         name=name)
        qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        attend = fused_attention if self.kind == "fused" else attention
        out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, n, d)
        return dense(d, "proj")(out)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = self.hidden_size
        mod = nn.Dense(6 * d, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="adaLN_modulation")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod(nn.silu(c)), 6, axis=-1)
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype,
                                         name=name)
        x = x + gate_msa[:, None] * Attention(d, self.num_heads, self.dtype, self.attention, name="attn")(
            modulate(norm("norm1")(x), shift_msa, scale_msa))
        h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
        h = nn.Dense(int(d * self.mlp_ratio), dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     name="mlp_fc1")(h)
        h = nn.gelu(h, approximate=True)
        h = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="mlp_fc2")(h)
        return x + gate_mlp[:, None] * h


class FinalLayer(nn.Module):
    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(nn.Dense(2 * self.hidden_size, dtype=self.dtype,
                                          kernel_init=nn.initializers.zeros, name="adaLN_modulation")(nn.silu(c)),
                                 2, axis=-1)
        x = modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype,
                                  name="norm_final")(x), shift, scale)
        return nn.Dense(self.patch_size ** 2 * self.out_channels, dtype=self.dtype,
                        kernel_init=nn.initializers.zeros, name="linear")(x)


class DiT(nn.Module):
    """Velocity network v(x, t, h, y) on NHWC images; returns [B, H, W, C] (and tokens on request).

    `y == num_classes` is the null (unconditional) class used for classifier-free guidance.
    """

    input_size: int
    in_channels: int
    num_classes: int
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    learn_sigma: bool = False  # official SiT checkpoints carry a second (unused) output half
    time_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32
    # Recompute each block's activations in the backward pass (flax nn.remat = jax.checkpoint): the same
    # parameters and values, activation memory of one block instead of `depth`; jax.jvp goes through it.
    remat: bool = False
    # Run the blocks as one jax.lax.scan over their stacked parameters instead of unrolling them: the same
    # parameter tree (blocks_0 ... blocks_{depth-1}) and values, a program `depth` times smaller to compile
    # (an unrolled XL/2 step took the TPU compiler over 16 GB of host memory). Without `remat`, a scan keeps
    # every block's intermediates for the backward pass: use the two together.
    scan_blocks: bool = False
    # "plain": softmax attention written out (forward- and reverse-mode differentiable). "fused":
    # jax.nn.dot_product_attention (cuDNN on GPUs in bfloat16): same parameters and values, but cuDNN's kernel
    # has no jvp rule, so the average-velocity network that MeanFlow differentiates with jax.jvp always runs
    # plain attention (hd.models.average_velocity_apply); teacher steps and refine's real and fake scores fuse.
    attention: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array, y: jax.Array,
                 *, return_tokens_at: int | None = None):
        if x.shape[1] != self.input_size or x.shape[2] != self.input_size:
            raise ValueError(f"DiT built for {self.input_size}x{self.input_size} inputs, got {x.shape}")
        if self.input_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not tile {self.input_size}x{self.input_size} "
                             "inputs (config.model.patch_size must divide the image size)")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS} (config.model.attention)")
        if return_tokens_at is not None and not 0 <= return_tokens_at < self.depth:
            raise ValueError(f"return_tokens_at={return_tokens_at} outside the {self.depth} blocks")
        p, d = self.patch_size, self.hidden_size
        grid = self.input_size // p
        tokens = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                         kernel_init=PATCH_KERNEL_INIT, name="x_embedder")(x.astype(self.dtype))
        tokens = tokens.reshape(x.shape[0], grid * grid, d) + sincos_pos_embed_2d(d, grid)[None].astype(self.dtype)

        temb = lambda zero, name: TimestepEmbedder(d, scale=self.time_scale, zero_output=zero, dtype=self.dtype,
                                                   name=name)
        c = temb(False, "t_embedder")(t) + temb(True, "h_embedder")(h)
        c = c + nn.Embed(self.num_classes + 1, d, embedding_init=nn.initializers.normal(0.02),
                         name="y_embedder")(y).astype(self.dtype)

        picked = None
        if self.scan_blocks and not self.is_initializing():
            tokens, picked = self._scan_blocks(tokens, c, return_tokens_at)
        else:
            block = nn.remat(DiTBlock) if self.remat else DiTBlock
            for i in range(self.depth):
                tokens = block(d, self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                               name=f"blocks_{i}")(tokens, c)
                if i == return_tokens_at:
                    picked = tokens
        out_channels = self.in_channels * (2 if self.learn_sigma else 1)
        out = FinalLayer(d, p, out_channels, self.dtype, name="final_layer")(tokens, c)
        out = out.reshape(x.shape[0], grid, grid, p, p, out_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], grid * p, grid * p, out_channels)
        out = out[..., : self.in_channels].astype(jnp.float32)
        return out if return_tokens_at is None else (out, picked)

    def _scan_blocks(self, tokens: jax.Array, c: jax.Array, return_tokens_at: int | None
                     ) -> tuple[jax.Array, jax.Array | None]:
        """The blocks as scans over their parameters stacked on a new leading axis (two scans when the tokens
        of a middle block are wanted)."""
        params = self.variables["params"]
        block = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, self.attention, parent=None)

        def body(x, block_params):
            return block.apply({"params": block_params}, x, c), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)  # inside a scan CSE cannot merge iterations

        def run(x, first, stop):
            if first == stop:
                return x
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                   *(params[f"blocks_{i}"] for i in range(first, stop)))
            return jax.lax.scan(body, x, stacked)[0]

        if return_tokens_at is None:
            return run(tokens, 0, self.depth), None
        picked = run(tokens, 0, return_tokens_at + 1)
        return run(picked, return_tokens_at + 1, self.depth), picked


# Sizes of the DiT/SiT family (hidden, depth, heads); "tiny" and "mini" are for tests and CPU runs.
DIT_SIZES = {
    "tiny": (32, 2, 2),
    "mini": (96, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
