"""The KL autoencoder of latent diffusion (diffusers' `AutoencoderKL`), in Flax, NHWC.

DiT, SiT and MeanFlow train on the latents of the Stable Diffusion VAE (`stabilityai/sd-vae-ft-ema` or
`sd-vae-ft-mse`): 4 latent channels, 8x downsampling, blocks of (128, 256, 512, 512) channels with 2 residual
layers each, GroupNorm(32, eps 1e-6), one single-head self-attention in each mid block, and latents multiplied
by `scaling_factor` = 0.18215 before the diffusion model sees them.

The architecture is built from the diffusers `config.json`, so any AutoencoderKL of the plain encoder/decoder
kind loads (tiny ones in tests). Module names follow diffusers (`encoder.down_blocks.0.resnets.1.norm1`
becomes the Flax path `encoder/down_blocks_0/resnets_1/norm1`), so the released
`diffusion_pytorch_model.safetensors` maps onto the parameters by name; `load_vae` reads it through
safetensors' numpy API (no torch) and checks every key and shape before building anything on it.

Conventions: images are NHWC in [-1, 1]; `encode` returns the posterior's mean and std, `decode` takes
latents; both work on UNscaled latents (multiply by `scaling_factor` for the diffusion model, divide before
decoding); a config's `shift_factor` / `latents_mean` (null for the SD-VAE) are recorded, never applied. With
dtype='bfloat16' the parameters stay float32, convolutions and attention run in bfloat16, and GroupNorm
statistics and the attention softmax are computed in float32. Outputs are float32. On GPUs XLA runs float32
convolutions and matmuls in TF32 by default (decoder output within ~1e-3 of the float32 reference on an H200,
relative to its scale); under `jax.default_matmul_precision("highest")` it is ~1e-6.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from hd.eval.inception import file_sha256

# The released sd-vae-ft-ema config.json values (sd-vae-ft-mse has the same architecture). Older releases of
# the file lack `scaling_factor`; diffusers' default, 0.18215, is the value DiT and SiT scale latents by.
SD_VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# diffusers' defaults for keys a config.json may omit (AutoencoderKL.__init__).
_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1, act_fn="silu",
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, use_quant_conv=True,
                 use_post_quant_conv=True, mid_block_add_attention=True, down_block_types=["DownEncoderBlock2D"],
                 up_block_types=["UpDecoderBlock2D"])
# Attention names of older diffusers files (and of the original LDM layout, as 1x1 convs) -> current names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
EPS = 1e-6  # diffusers hard-codes resnet and attention GroupNorm eps at 1e-6 in these encoders/decoders


# --- Layers -----------------------------------------------------------------------------------------------

class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC, statistics in float32 whatever the compute dtype."""
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # spatial and within-group channel axes
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)  # biased, as torch
        normed = ((grouped - mean) * jax.lax.rsqrt(var + EPS)).reshape(x.shape)
        return (normed * scale + bias).astype(self.dtype)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: norm-silu-conv twice, 1x1 shortcut when widths differ."""
    features: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.features, 3, self.dtype, "conv1")(nn.silu(GroupNorm(self.num_groups, self.dtype,
                                                                           name="norm1")(x)))
        h = _conv(self.features, 3, self.dtype, "conv2")(nn.silu(GroupNorm(self.num_groups, self.dtype,
                                                                           name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
        return x.astype(self.dtype) + h


class Attention(nn.Module):
    """The mid block's single-head self-attention over all positions, with a GroupNorm in front and a residual."""
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = GroupNorm(self.num_groups, self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
        q, k, v = (dense(name=n)(tokens) for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # diffusers upcasts the softmax too
        out = dense(name="to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x.astype(self.dtype) + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, optional attention, resnet, all at one width."""
    features: int
    num_groups: int
    dtype: Any = jnp.float32
    add_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.features, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.features, self.num_groups, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """diffusers Downsample2D (zero pad right/bottom by one, 3x3 stride-2 conv) or Upsample2D (nearest x2, conv)."""
    features: int
    down: bool
    dtype: Any = jnp.float32

    def setup(self) -> None:
        stride, padding = (2, ((0, 1), (0, 1))) if self.down else (1, "SAME")
        self.conv = nn.Conv(self.features, (3, 3), strides=(stride, stride), padding=padding, dtype=self.dtype,
                            param_dtype=jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.down:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Stage(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then an optional resampler."""
    features: int
    num_layers: int
    num_groups: int
    resample: str  # "down", "up" or ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.num_groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample:
            name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
            x = Resample(self.features, self.resample == "down", self.dtype, name=name)(x)
        return x


class Encoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    num_groups: int
    out_channels: int  # 2 * latent channels: mean and log-variance
    mid_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, features in enumerate(self.block_out_channels):
            x = Stage(features, self.layers_per_block, self.num_groups, "down" if i < last else "", self.dtype,
                      name=f"down_blocks_{i}")(x)
        x = MidBlock(self.block_out_channels[-1], self.num_groups, self.dtype,
                     add_attention=self.mid_attention, name="mid_block")(x)
        x = nn.silu(GroupNorm(self.num_groups, self.dtype, name="conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    num_groups: int
    out_channels: int
    mid_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = _conv(self.block_out_channels[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(self.block_out_channels[-1], self.num_groups, self.dtype,
                     add_attention=self.mid_attention, name="mid_block")(x)
        reversed_channels = self.block_out_channels[::-1]
        last = len(reversed_channels) - 1
        for i, features in enumerate(reversed_channels):
            # The decoder's blocks have one resnet more than the encoder's (diffusers: layers_per_block + 1).
            x = Stage(features, self.layers_per_block + 1, self.num_groups, "up" if i < last else "", self.dtype,
                      name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(self.num_groups, self.dtype, name="conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL (plain encoder/decoder blocks). Build it with `AutoencoderKL.from_config`."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype: str = "float32") -> "AutoencoderKL":
        """The module a diffusers config.json describes; a ValueError for anything it cannot build."""
        c = check_config(config)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
        return cls(in_channels=c["in_channels"], out_channels=c["out_channels"],
                   latent_channels=c["latent_channels"], block_out_channels=tuple(c["block_out_channels"]),
                   layers_per_block=c["layers_per_block"], norm_num_groups=c["norm_num_groups"],
                   use_quant_conv=c["use_quant_conv"], use_post_quant_conv=c["use_post_quant_conv"],
                   mid_block_add_attention=c["mid_block_add_attention"], dtype=_DTYPES[dtype])

    def setup(self) -> None:
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      num_groups=self.norm_num_groups, mid_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NHWC images in [-1, 1] -> posterior mean and std (float32), unscaled latents."""
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        # As diffusers' DiagonalGaussianDistribution: the log-variance is clipped before exponentiating.
        return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled NHWC latents -> NHWC images (about [-1, 1], float32)."""
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Posterior mean, std and the decoded mean (creates every parameter at init)."""
        mean, std = self.encode(images)
        return mean, std, self.decode(mean)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def check_config(config: dict) -> dict:
    """The config with diffusers' defaults filled in; a ValueError naming any value this port cannot build."""
    if not isinstance(config, dict):
        raise ValueError(f"an AutoencoderKL config must be a dict (config.json contents), got {type(config).__name__}")
    c = {**_DEFAULTS, **config}
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config _class_name={c['_class_name']!r}: only diffusers AutoencoderKL is supported")
    channels = list(c["block_out_channels"])
    if not channels or any(int(ch) <= 0 for ch in channels):
        raise ValueError(f"config block_out_channels={channels!r} must be a non-empty list of positive ints")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[key])
        if len(types) != len(channels) or any(t != kind for t in types):
            raise ValueError(f"config {key}={types!r}: this port builds {len(channels)} x {kind!r} "
                             f"(one per block_out_channels entry)")
    if c["act_fn"] != "silu":
        raise ValueError(f"config act_fn={c['act_fn']!r}: only 'silu' (every released AutoencoderKL) is supported")
    groups = int(c["norm_num_groups"])
    if groups <= 0 or any(ch % groups for ch in channels):
        raise ValueError(f"config norm_num_groups={groups} must divide every block_out_channels entry {channels}")
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        if int(c[key]) <= 0:
            raise ValueError(f"config {key}={c[key]!r} must be a positive integer")
    return c


# --- The bound autoencoder ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _encode(module: AutoencoderKL, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return module.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    return module.apply({"params": params}, latents, method="decode")


@dataclasses.dataclass(frozen=True)
class VAE:
    """An AutoencoderKL with its parameters, its latent scale and the config.json it was built from.

    `encode`/`decode` run jitted on the default devices. To shard over the batch, jit the pure forms yourself:
    `jax.jit(vae.decode_fn, in_shardings=(replicated, batch), out_shardings=batch)(vae.params, latents)`.
    """
    module: AutoencoderKL
    params: Any
    scaling_factor: float
    config: dict

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NHWC images in [-1, 1] -> posterior (mean, std), NHWC latents, unscaled."""
        _check_input(images, self.module.in_channels, self.module.downsampling, "images")
        return _encode(self.module, self.params, images)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled NHWC latents -> NHWC images (about [-1, 1])."""
        _check_input(latents, self.module.latent_channels, 1, "latents")
        return _decode(self.module, self.params, latents)

    @property
    def encode_fn(self) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
        """(params, images) -> (mean, std): pure, for jit with explicit shardings."""
        return _pure(self.module, "encode")

    @property
    def decode_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        """(params, latents) -> images: pure, for jit with explicit shardings."""
        return _pure(self.module, "decode")

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def _pure(module: AutoencoderKL, method: str) -> Callable:
    return lambda params, x: module.apply({"params": params}, x, method=method)


def _check_input(x: Any, channels: int, multiple: int, what: str) -> None:
    shape = tuple(np.shape(x))
    if len(shape) != 4 or shape[-1] != channels or shape[1] % multiple or shape[2] % multiple:
        raise ValueError(f"{what} of shape {shape}: expected NHWC [batch, height, width, {channels}] with height "
                         f"and width multiples of {multiple}")


def abstract_params(module: AutoencoderKL) -> Any:
    """The parameter tree's shapes (float32), without computing anything."""
    size = module.downsampling
    dummy = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), dummy)["params"]


def vae_from_config(config: dict, key: jax.Array, dtype: str = "float32") -> VAE:
    """A VAE with random weights at flax's default scales (kernels N(0, 1/fan_in), zero biases, unit norm
    scales), for tests, benchmarks and tiny pipelines.

    Drawn with numpy from `key`, leaf by leaf on the abstract tree: compiling `module.init` would take ~15 s
    (tiny) to ~30 s (SD-VAE) on a CPU for the same result.
    """
    module = AutoencoderKL.from_config(config, dtype)
    c = check_config(config)
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel().tolist())

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))
        return jnp.ones(leaf.shape, jnp.float32) if name == "scale" else jnp.zeros(leaf.shape, jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, abstract_params(module))
    return VAE(module, params, float(c["scaling_factor"]), dict(config))


# --- diffusers layout ---------------------------------------------------------------------------------------

def _diffusers_name(path: tuple[str, ...]) -> str:
    """Flax path -> diffusers key: ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
    'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*parts, "weight" if leaf in ("kernel", "scale") else leaf])


def diffusers_shapes(module: AutoencoderKL) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every key of the module's diffusers state dict -> (its torch shape, the Flax parameter path)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(module))[0]
    out = {}
    for keys, leaf in flat:
        path = tuple(k.key for k in keys)
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":  # Flax HWIO / [in, out] -> torch OIHW / [out, in]
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[_diffusers_name(path)] = (shape, path)
    return out


def _to_flax(array: np.ndarray, flax_path: tuple[str, ...], flax_ndim: int) -> np.ndarray:
    if flax_path[-1] != "kernel":
        return array
    if flax_ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    return np.transpose(array.reshape(array.shape[:2]))  # [out, in] (or legacy [out, in, 1, 1]) -> [in, out]


def _canonical_key(key: str) -> str:
    """Legacy attention names (query/key/value/proj_attn) -> current diffusers names; others unchanged."""
    match = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    return f"{match.group(1)}.{_LEGACY_ATTENTION[match.group(2)]}.{match.group(3)}" if match else key


def state_dict_to_params(state_dict: dict[str, np.ndarray], module: AutoencoderKL, source: str = "state dict") -> Any:
    """A diffusers AutoencoderKL state dict (numpy) -> the module's Flax parameters, float32.

    Every key and shape is checked first: a missing or misshaped key is a ValueError naming the first one
    (with both shapes), extra keys a ValueError listing them. Attention weights may use the legacy names and
    the legacy 1x1-conv shape [out, in, 1, 1].
    """
    expected = diffusers_shapes(module)
    renamed: dict[str, str] = {}
    for key in state_dict:
        canonical = _canonical_key(key)
        if canonical in renamed:
            raise ValueError(f"{source}: {renamed[canonical]!r} and {key!r} are the same weight under its current "
                             "and legacy names; keep one")
        renamed[canonical] = key
    extra = sorted(renamed[k] for k in renamed if k not in expected)
    for key, (shape, path) in expected.items():
        if key not in renamed:
            raise ValueError(f"{source}: missing key {key!r} (expected shape {shape}) for this config; is the "
                             f"config.json the one these weights were saved with?")
        got = tuple(np.shape(state_dict[renamed[key]]))
        legacy_conv = ".attentions." in key and path[-1] == "kernel" and got == (*shape, 1, 1)
        if got != shape and not legacy_conv:
            raise ValueError(f"{source}: key {renamed[key]!r} has shape {got}, but this config expects {shape}")
    if extra:
        raise ValueError(f"{source}: {len(extra)} unexpected key(s) not in an AutoencoderKL of this config: "
                         f"{extra[:20]}{' ...' if len(extra) > 20 else ''}")
    flat = {}
    for key, (shape, path) in expected.items():
        array = np.asarray(state_dict[renamed[key]], dtype=np.float32)
        flat[path] = _to_flax(array, path, len(shape))
    return _unflatten(flat)


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax parameters -> a diffusers AutoencoderKL state dict (current names, torch layouts), float32."""
    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in keys)
        array = np.asarray(leaf, dtype=np.float32)
        if path[-1] == "kernel":
            array = np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T
        out[_diffusers_name(path)] = np.ascontiguousarray(array)
    return out


def _unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_vae(directory: str, *, sha256: str = "", dtype: str = "float32") -> VAE:
    """A VAE from a diffusers folder: config.json + diffusion_pytorch_model.safetensors (read without torch).

    sha256: when given, the safetensors file must have this sha256 (checked before it is read).
    """
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: a diffusers AutoencoderKL folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} (e.g. from huggingface.co/stabilityai/sd-vae-ft-ema)")
    if sha256:
        actual = file_sha256(weights_path)
        if actual != sha256.strip().lower():
            raise ValueError(f"{weights_path} has sha256 {actual}, but {sha256} was expected: the file is corrupt, "
                             "truncated or other weights. Download it again, or pass the sha256 of the weights "
                             "you mean to use.")
    with open(config_path) as f:
        config = json.load(f)
    module = AutoencoderKL.from_config(config, dtype)
    params = state_dict_to_params(load_file(weights_path), module, source=weights_path)
    return VAE(module, jax.tree.map(jnp.asarray, params), float(check_config(config)["scaling_factor"]), config)


def save_vae(vae: VAE, directory: str) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors (the diffusers layout `load_vae` reads).

    Existing files are never overwritten: each is written to a temporary name and moved in place at the end.
    """
    targets = [os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)]
    present = [p for p in targets if os.path.exists(p)]
    if present:
        raise FileExistsError(f"{present} already exist(s): save the VAE to a new folder")
    os.makedirs(directory, exist_ok=True)
    config = {**vae.config, "scaling_factor": vae.scaling_factor}
    state_dict = params_to_state_dict(vae.params)
    temps = []
    try:
        for target, write in zip(targets, (lambda p: _write_json(config, p),
                                           lambda p: save_file(state_dict, p, metadata={"format": "pt"}))):
            fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(target))
            os.close(fd)
            temps.append(temp)
            write(temp)
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


def _write_json(config: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
