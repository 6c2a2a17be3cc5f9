"""InceptionV3 as used for FID (the TF 2015-12-05 graph, as ported by pytorch-fid), in Flax linen.

Architecture = torchvision's Inception3 without the aux head, 1008 logits, with pytorch-fid's FID patches:
the 3×3 average pools in Mixed_5b-d, Mixed_6b-e and Mixed_7b ignore the padding (TF semantics,
`count_include_pad=False`), and Mixed_7c uses a 3×3 max pool in its pool branch. BatchNorm eps = 1e-3,
always in inference mode. Outputs: 'pool' [B, 2048] (global average of Mixed_7c, the FID feature, TF's
pool_3) and 'logits' [B, 1008] (fc on 'pool', as in TF's softmax layer; no softmax applied).

FID pipeline (`preprocess_for_inception`), to make numbers reproducible:
1. Images are NHWC. uint8 images are taken as-is in [0, 255]. Float images are taken to be in [-1, 1] (this
   codebase's sample range) and quantised like a saved PNG: round((x + 1) · 127.5) clipped to [0, 255], so
   generated samples go through the same uint8 step as the reference images.
2. One channel is repeated to three.
3. Resize to 299×299 with `jax.image.resize(method="bilinear", antialias=False)` unless already 299×299.
   This is the half-pixel-centre convention of pytorch-fid's `F.interpolate(mode="bilinear",
   align_corners=False)` and of TF2's `tf.image.resize(method="bilinear")`, both without antialiasing
   (jax's default antialias=True would blur when downsampling and shift FID). The original TF1 graph resized
   inside the graph with the legacy corner-aligned convention, so FIDs of non-299 images can differ slightly
   from numbers computed with that graph; at 299×299 no resize happens and all agree.
4. Scale to [-1, 1] as x / 127.5 − 1 (pytorch-fid's 2·(x/255) − 1).
Convolutions and the fc use HIGHEST matmul precision so TPUs/TF32 GPUs do not silently compute FID in bf16/tf32.

Weights come only from a file the user supplies, checked against a sha256 (`load_inception_params`).
File format: a pickle holding a nested dict of numpy arrays, either
(a) the nested layout (the naming jax-fid uses), module path → leaves:
      {'Conv2d_1a_3x3': {'conv': {'kernel': HWIO}, 'bn': {'scale', 'bias', 'mean', 'var'}}, ...,
       'Mixed_5b': {'branch1x1': {'conv': ..., 'bn': ...}, ...}, ..., 'fc': {'kernel': [2048, 1008], 'bias'}}
    Extra 'AuxLogits' entries and all-zero conv biases are ignored; or
(b) a flat pytorch-fid state dict {'Conv2d_1a_3x3.conv.weight': OIHW, '....bn.running_mean', 'fc.weight', ...}
    as numpy arrays. `python -m hd.eval.convert_inception` turns pytorch-fid's .pth into layout (a).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INCEPTION_SIZE = 299
NUM_LOGITS = 1008
MIN_SIZE = 75  # smallest input for which Mixed_7a still has a valid 3×3/stride-2 window
BN_EPS = 1e-3

Variables = dict[str, Any]


class _ConvBN(nn.Module):
    """pytorch-fid's BasicConv2d: bias-free conv, BatchNorm (eps 1e-3), ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = _ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = _ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = _ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = _ConvBN(c7, (1, 1), name="branch7x7_1")(x)
        b7 = _ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = _ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = _ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = _ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionE(nn.Module):
    max_pool: bool  # the FID graph's last block (Mixed_7c) max-pools; Mixed_7b average-pools

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = _ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([_ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = _ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = _ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = _ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3. Input: NHWC float in [-1, 1], 299×299 for FID (any size >= 75 runs)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"expected [B, H >= {MIN_SIZE}, W >= {MIN_SIZE}, 3] input, got {x.shape}")
        x = _ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = _ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = _ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = _ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        x = _InceptionC(128, name="Mixed_6b")(x)
        x = _InceptionC(160, name="Mixed_6c")(x)
        x = _InceptionC(160, name="Mixed_6d")(x)
        x = _InceptionC(192, name="Mixed_6e")(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_LOGITS, precision=jax.lax.Precision.HIGHEST, name="fc")(pool)
        return {"pool": pool, "logits": logits}


def quantize_to_uint8(images: jax.Array) -> jax.Array:
    """Float images in [-1, 1] -> uint8 as a saved PNG holds them: round(clip((x + 1) · 127.5, 0, 255)).

    The one quantisation rule of every FID in hd (samples fed as floats and samples exported to .npz agree
    bit for bit). It equals DiT/SiT's `clamp(127.5 x + 128, 0, 255).to(uint8)` except at exact half-integers
    (round half to even here, half up there: a measure-zero set for network outputs). guided-diffusion's own
    sampling script truncates instead (`((x + 1) * 127.5).clamp(0, 255).to(uint8)`), 0.5 grey levels darker
    on average.
    """
    x = jnp.clip((jnp.asarray(images).astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
    return jnp.round(x).astype(jnp.uint8)


def preprocess_for_inception(images: np.ndarray | jax.Array) -> jax.Array:
    """NHWC uint8 [0, 255] or float [-1, 1] images, 1 or 3 channels → [B, 299, 299, 3] float32 in [-1, 1].

    See the module docstring for why each step is what it is.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = quantize_to_uint8(images).astype(jnp.float32)
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    b, h, w, c = x.shape
    if (h, w) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = jax.image.resize(x, (b, INCEPTION_SIZE, INCEPTION_SIZE, c), method="bilinear", antialias=False)
    if c == 1:
        x = jnp.repeat(x, 3, axis=-1)  # after the resize: resizing one channel is 3× cheaper, result identical
    return x / 127.5 - 1.0


@jax.jit
def inception_features(variables: Variables, images: jax.Array) -> dict[str, jax.Array]:
    """Preprocess (see `preprocess_for_inception`) and run the network: {'pool': [B, 2048], 'logits': [B, 1008]}."""
    return InceptionV3().apply(variables, preprocess_for_inception(images))


def init_inception_params(seed: int = 0) -> Variables:
    """Random variables {'params', 'batch_stats'} for tests and shape templates (useless for FID).

    He-normal kernels, identity BatchNorm. Built with numpy from the abstract shapes because jitting
    `InceptionV3().init` spends about a minute compiling ~100 random initialisers on CPU.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in _expected_shapes().items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            flat[name] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        else:
            flat[name] = np.ones(shape) if leaf in ("scale", "var") else np.zeros(shape)
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")


def abstract_inception_variables() -> Variables:
    """The variables' shapes as float32 ShapeDtypeStructs: lowering without weights (hd.compile_check)."""
    return traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in _expected_shapes().items()}, sep="/")


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}


def _validated(variables: Mapping[str, Any], source: str) -> Variables:
    """Check names and shapes against the model exactly, and return float32 numpy variables."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
    expected = _expected_shapes()
    missing = sorted(expected.keys() - flat.keys())
    unexpected = sorted(flat.keys() - expected.keys())
    wrong = sorted(f"{k}: {flat[k].shape} != {expected[k]}" for k in expected.keys() & flat.keys()
                   if flat[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"InceptionV3 weights from {source} do not fit the FID InceptionV3: "
                         f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
                         f"{len(wrong)} wrong shapes {wrong[:5]}")
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray]) -> Variables:
    """Map a pytorch-fid state dict (flat names, numpy arrays) to flax variables {'params', 'batch_stats'}.

    Conv OIHW → HWIO; BN weight/bias → params scale/bias, running_mean/var → batch_stats mean/var;
    fc.weight [1008, 2048] → fc.kernel [2048, 1008]. num_batches_tracked and AuxLogits.* are dropped.
    Pure numpy; the result is validated against the model.
    """
    flat: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        *path, leaf = name.split(".")
        where = "/".join(path)
        if path[:1] == ["AuxLogits"] or leaf == "num_batches_tracked":
            continue
        if path[-1:] == ["conv"] and leaf == "weight":
            flat[f"params/{where}/kernel"] = value.transpose(2, 3, 1, 0)
        elif path[-1:] == ["bn"] and leaf in ("weight", "bias"):
            flat[f"params/{where}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif path[-1:] == ["bn"] and leaf in ("running_mean", "running_var"):
            flat[f"batch_stats/{where}/{leaf.removeprefix('running_')}"] = value
        elif path == ["fc"] and leaf == "weight":
            flat["params/fc/kernel"] = value.T
        elif path == ["fc"] and leaf == "bias":
            flat["params/fc/bias"] = value
        else:
            raise ValueError(f"unexpected entry {name!r} in the pytorch-fid state dict")
    return _validated(traverse_util.unflatten_dict(flat, sep="/"), "a torch state dict")


def variables_to_nested(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables → the nested file layout (a): BN running stats sit beside scale/bias under 'bn'."""
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    flat.update(traverse_util.flatten_dict(dict(variables["batch_stats"])))
    return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})


def nested_to_variables(tree: Mapping[str, Any], source: str = "a nested dict") -> Variables:
    """The nested file layout (a) → validated flax variables."""
    out: dict[tuple[str, ...], np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
        if path[0] == "AuxLogits":
            continue
        if path[-2:-1] == ("conv",) and path[-1] == "bias":
            if np.any(np.asarray(value) != 0):
                raise ValueError(f"{source}: non-zero conv bias at {'/'.join(path)}; the FID network has none")
            continue
        collection = "batch_stats" if path[-1] in ("mean", "var") else "params"
        out[(collection, *path)] = value
    return _validated(traverse_util.unflatten_dict(out), source)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_inception_params(variables: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write variables in the nested layout (a) as a pickle; returns the file's sha256 to pin in configs."""
    with open(path, "wb") as f:
        pickle.dump(variables_to_nested(variables), f, protocol=4)
    return file_sha256(path)


def load_inception_params(path: str | os.PathLike, expected_sha256: str | None) -> Variables:
    """Load FID InceptionV3 variables {'params', 'batch_stats'} from a pickle in layout (a) or (b).

    The sha256 is checked before unpickling (a pickle can run code). With expected_sha256=None the file is
    loaded with a warning that gives its hash, so it can be pinned.
    """
    # What the file must be, for every error below: where a good one comes from.
    made_by = ("It must be pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) converted "
               "with `python -m hd.eval.convert_inception --pt pt_inception-2015-12-05-6726825d.pth --out FILE`, "
               "which prints the sha256 to set as config.eval.inception_sha256.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path} (config.eval.inception_weights) does not exist. "
                                + made_by)
    actual = file_sha256(path)
    if expected_sha256 is None:
        warnings.warn(f"Inception weights {path} are not verified; pin them with expected_sha256={actual!r}")
    elif actual != expected_sha256.strip().lower():
        raise ValueError(
            f"Inception weights file {path} has sha256 {actual}, but {expected_sha256} was expected. "
            "The file is corrupt, truncated or a different network: get or convert it again "
            "(python -m hd.eval.convert_inception). Only if you deliberately switched weights, update the "
            "configured hash; FIDs computed with different weights are not comparable."
        )
    with open(path, "rb") as f:
        try:
            tree = pickle.load(f)
        except Exception as e:  # garbage raises UnpicklingError, EOFError, ValueError, ... depending on the bytes
            raise ValueError(f"Inception weights file {path} (sha256 {actual}) is not a pickle of InceptionV3 "
                             f"weights ({type(e).__name__}: {e}). " + made_by) from e
    if not isinstance(tree, Mapping):
        raise ValueError(f"Inception weights file {path}: expected a pickled dict of numpy arrays, got "
                         f"{type(tree).__name__}. " + made_by)
    if all("." in key for key in tree):
        return torch_state_dict_to_variables(tree)
    return nested_to_variables(tree, str(path))
