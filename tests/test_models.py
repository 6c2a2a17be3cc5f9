"""DiT and MLP velocity networks: shapes, the zero-initialised h-embedding, requested tokens, sin-cos positions.

Everything runs jitted (op-by-op Flax costs seconds per call on this CPU); sizes above "mini" only go through
jax.eval_shape.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hd.models import build_model
from hd.models.dit import DIT_SIZES, DiT, sincos_pos_embed_2d
from hd.models.mlp import MLP


def _inputs(batch, shape, num_labels=10, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=batch), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_labels, batch), jnp.int32)
    return x, t, y


def _dit(size, input_size, channels, patch, num_classes=10):
    hidden, depth, heads = DIT_SIZES[size]
    return DiT(input_size=input_size, in_channels=channels, num_classes=num_classes, patch_size=patch,
               hidden_size=hidden, depth=depth, num_heads=heads)


def _init(model, x, t, y):
    return jax.jit(model.init)(jax.random.PRNGKey(0), x, t, t, y)["params"]


def _nonzero(params, skip=("h_embedder",)):
    """The DiT starts with zero adaLN and final layers (output identically 0). Give every all-zero leaf outside
    `skip` random values, so outputs carry signal and differences would show."""
    rng = np.random.default_rng(0)  # numpy: a jax.random call per new shape would compile each time
    flat = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, a in flat[0]:
        keep = np.any(np.asarray(a)) or any(getattr(k, "key", None) in skip for k in path)
        leaves.append(a if keep else jnp.asarray(0.05 * rng.standard_normal(a.shape), jnp.float32))
    return jax.tree.unflatten(flat[1], leaves)


def _apply_all(model, depth):
    """One compiled function: the output, and (output, tokens) at the first and the last block."""

    def fn(params, x, t, h, y):
        apply = lambda **kw: model.apply({"params": params}, x, t, h, y, **kw)
        return apply(), apply(return_tokens_at=0), apply(return_tokens_at=depth - 1)

    return jax.jit(fn)


@pytest.fixture(scope="module")
def tiny_dit():
    """A really initialised tiny DiT on 28x28x1 (Fashion-MNIST's shape), patch 7: 16 tokens."""
    model = _dit("tiny", 28, 1, 7)
    x, t, y = _inputs(3, (28, 28, 1))
    return model, (x, t, y), _init(model, x, t, y), _apply_all(model, 2)


@pytest.fixture(scope="module")
def mlp():
    model = MLP(in_features=2, num_classes=8, width=48, depth=3)
    x, t, y = _inputs(5, (2,), num_labels=8)
    return model, (x, t, y), _init(model, x, t, y), _apply_all(model, 3)


def _random_params(model, x, t, y):
    """Parameters of the right structure without compiling an initialiser: shapes from jax.eval_shape,
    values from numpy."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t, y)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), abstract)


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_dit_output_and_token_shapes(size, tiny_dit):
    if size == "tiny":
        model, (x, t, y), params, apply_all = tiny_dit
        params = _nonzero(params)
        input_size, channels, patch, batch = 28, 1, 7, 3
    else:
        input_size, channels, patch, batch = 16, 3, 4, 2
        model = _dit("mini", input_size, channels, patch)
        x, t, y = _inputs(batch, (input_size, input_size, channels))
        params = _random_params(model, x, t, y)
        apply_all = _apply_all(model, DIT_SIZES[size][1])
    hidden, depth, _ = DIT_SIZES[size]
    chex.assert_shape(params["x_embedder"]["kernel"], (patch, patch, channels, hidden))
    assert len([k for k in params if k.startswith("blocks_")]) == depth
    out, (out_first, tokens_first), (out_last, tokens_last) = apply_all(params, x, t, t, y)
    chex.assert_shape(out, (batch, input_size, input_size, channels))
    assert out.dtype == jnp.float32 and float(jnp.std(out)) > 0
    num_tokens = (input_size // patch) ** 2
    chex.assert_shape([tokens_first, tokens_last], (batch, num_tokens, hidden))
    assert not np.allclose(tokens_first, tokens_last)  # different blocks give different tokens
    chex.assert_trees_all_close(out_first, out)  # asking for tokens does not change the output
    chex.assert_trees_all_close(out_last, out)


@pytest.mark.parametrize("size,input_size,channels,patch,num_classes", [
    ("S", 8, 4, 2, 10),
    ("XL", 32, 4, 2, 1000),
])
def test_dit_shapes_abstractly(size, input_size, channels, patch, num_classes):
    """Larger sizes through jax.eval_shape only: shapes and parameter counts, no memory or FLOPs spent."""
    model = _dit(size, input_size, channels, patch, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, input_size, input_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t, y)
    out, tokens = jax.eval_shape(lambda v, x, t, y: model.apply(v, x, t, t, y, return_tokens_at=3),
                                 variables, x, t, y)
    hidden, depth, heads = DIT_SIZES[size]
    assert out.shape == (1, input_size, input_size, channels) and out.dtype == jnp.float32
    assert tokens.shape == (1, (input_size // patch) ** 2, hidden)
    params = variables["params"]
    chex.assert_shape(params["blocks_0"]["attn"]["qkv"]["kernel"], (hidden, 3 * hidden))
    chex.assert_shape(params["blocks_0"]["mlp_fc1"]["kernel"], (hidden, 4 * hidden))
    chex.assert_shape(params["y_embedder"]["embedding"], (num_classes + 1, hidden))  # + the null class
    chex.assert_shape(params["final_layer"]["linear"]["kernel"], (hidden, patch * patch * channels))
    assert len([k for k in params if k.startswith("blocks_")]) == depth
    # Per block: qkv + proj + mlp (ratio 4) + adaLN (6 * hidden outputs) = 18 d^2 weights and 15 d biases.
    block_params = sum(int(np.prod(a.shape)) for k, v in params.items() if k.startswith("blocks_")
                       for a in jax.tree.leaves(v))
    assert block_params == depth * (18 * hidden ** 2 + 15 * hidden)


def test_dit_rejects_patch_that_does_not_tile():
    model = _dit("tiny", 28, 1, 5)
    x, t, y = _inputs(1, (28, 28, 1))
    with pytest.raises(ValueError, match=r"patch_size=5 does not tile 28x28"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t, y)


def _with_h_output(params, scale=0.5):
    """The h-embedding's output layer made non-zero, as training the student would."""
    layer = params["h_embedder"]["mlp_2"]
    rng = np.random.default_rng(7)
    new_layer = dict(kernel=jnp.asarray(scale * rng.standard_normal(layer["kernel"].shape), jnp.float32),
                     bias=jnp.full_like(layer["bias"], scale))
    return dict(params, h_embedder=dict(params["h_embedder"], mlp_2=new_layer))


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_output_does_not_depend_on_h_at_init(kind, tiny_dit, mlp):
    model, (x, t, y), params, apply_all = tiny_dit if kind == "dit" else mlp
    np.testing.assert_array_equal(params["h_embedder"]["mlp_2"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["h_embedder"]["mlp_2"]["bias"], 0.0)
    # Every other zero-initialised layer is made random: the h-independence must come from the h-embedding's
    # output layer alone, not from an all-zero network.
    params = _nonzero(params)
    apply = lambda p, h: apply_all(p, x, t, h, y)[0]  # the plain output, compiled once per model
    h1, h2 = jnp.zeros_like(t), jnp.linspace(0.1, 0.9, t.shape[0])
    out1, out2 = apply(params, h1), apply(params, h2)
    assert float(jnp.max(jnp.abs(out1))) > 1e-3
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    # The check has teeth: once the h-embedding's output layer is non-zero, h changes the output.
    trained = _with_h_output(params)
    assert float(jnp.max(jnp.abs(apply(trained, h1) - apply(trained, h2)))) > 1e-4


def test_mlp_shapes_tokens_and_labels(mlp):
    model, (x, t, y), params, apply_all = mlp
    out, (out_first, tokens_first), (out_last, tokens_last) = apply_all(params, x, t, t, y)
    chex.assert_shape(out, (5, 2))
    chex.assert_shape([tokens_first, tokens_last], (5, 1, 48))  # one token per example
    chex.assert_trees_all_close(out_first, out)
    chex.assert_trees_all_close(out_last, out)
    with pytest.raises(ValueError, match="return_tokens_at=3"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t, t, y, return_tokens_at=3), params)
    # The class (and the null class, index 8) reaches the output.
    out_null = apply_all(params, x, t, t, jnp.full_like(y, 8))[0]
    assert float(jnp.max(jnp.abs(out - out_null))) > 1e-4


def test_build_model_from_config():
    cfg = ml_collections.ConfigDict(dict(name="dit", size="mini", patch_size=4, mlp_ratio=4.0, learn_sigma=False,
                                         time_scale=1000.0, width=1, depth=1, dtype="float32"))
    model = build_model(cfg, (16, 16, 3), 10)
    assert (model.hidden_size, model.depth, model.num_heads) == DIT_SIZES["mini"]
    assert (model.input_size, model.in_channels, model.patch_size, model.num_classes) == (16, 3, 4, 10)
    cfg.name, cfg.width, cfg.depth = "mlp", 64, 2
    model = build_model(cfg, (2,), 8)
    assert (model.in_features, model.width, model.depth, model.num_classes) == (2, 64, 2, 8)


def _sincos_reference(dim, grid):
    """Direct formula: token n = i * grid + j (row i, column j); the first half of the channels encodes the
    column j, the second half the row i, each as [sin(p w_k) for k, cos(p w_k) for k], w_k = 10000^(-k/(dim/4))."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                out[i * grid + j, k] = np.sin(j * w)
                out[i * grid + j, quarter + k] = np.cos(j * w)
                out[i * grid + j, 2 * quarter + k] = np.sin(i * w)
                out[i * grid + j, 3 * quarter + k] = np.cos(i * w)
    return out


@pytest.mark.parametrize("dim,grid", [(8, 3), (32, 4), (384, 2)])
def test_sincos_positions_match_formula(dim, grid):
    got = sincos_pos_embed_2d(dim, grid)
    assert got.shape == (grid * grid, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, _sincos_reference(dim, grid), atol=1e-6)


def test_sincos_rejects_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(30, 2)
