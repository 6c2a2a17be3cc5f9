"""Discriminator heads (docs/method.md, AWD): AWD starts as global average pooling, its weights are a distribution
over tokens, the entropy metric, AWD finding a planted local defect that GAP averages away, the conv head, and
the generator-side 'logit' weighting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hd.models.heads import AWDHead, ConvHead, GAPHead, build_head, discriminator_output, weight_entropy
from hd.objectives.adversarial import discriminator_loss


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _quick_jit(fn, *args):
    """fn(*args) compiled as one program (op-by-op dispatch compiles every operation) and without XLA's backend
    optimisations: these small graphs then compile several times faster on CPU and still run in milliseconds."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def _init(head, tokens, seed=0):
    return _quick_jit(head.init, jax.random.PRNGKey(seed), tokens)["params"]


def _apply(head, params, tokens, for_generator=False):
    return _quick_jit(lambda p, x: head.apply({"params": p}, x, for_generator=for_generator), params, tokens)


def _random_params(head, tokens, seed=0, scale=0.3):
    """Parameters of the right shapes filled with N(0, scale^2) (LayerNorm scales at 1). Used for the conv head:
    XLA on CPU takes seconds to compile jax.random.truncated_normal for a 4-D kernel (8 s for 3x3x8x16 vs 0.8 s
    for the same numbers as 144x16, measured on a loaded 2-core machine)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), tokens)["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if path[-1].key == "scale" else
        jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes)


_entropy = jax.jit(weight_entropy)
_output = jax.jit(discriminator_output)


def _layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize("num_heads", [1, 3])
def test_awd_with_zero_query_is_global_average_pooling(num_heads):
    tokens = _tokens((3, 10, 16))
    awd = AWDHead(num_heads=num_heads, key_size=8, width=32)
    params = _init(awd, tokens, seed=1)
    assert params["query"].shape == (num_heads, 8) and not np.any(params["query"])  # starts at zero
    logits, weights = _apply(awd, params, tokens)
    assert logits.shape == weights.shape == (3, 10, num_heads)
    np.testing.assert_allclose(weights, 0.1, rtol=1e-6)
    d = _output(logits, weights)
    assert d.shape == (3,)
    np.testing.assert_allclose(d, np.asarray(logits).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    if num_heads == 1:
        # A GAP head holding the same per-token logits MLP gives the same logits, weights and output.
        gap = GAPHead(width=32)
        gap_logits, gap_weights = _apply(gap, {"logits": params["logits"]}, tokens)
        np.testing.assert_array_equal(gap_logits, logits)
        np.testing.assert_allclose(gap_weights, weights, rtol=1e-6)
        np.testing.assert_allclose(_output(gap_logits, gap_weights), d, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_awd_weights_are_a_softmax_over_tokens(num_heads):
    """With a non-zero query the weights follow softmax_i(q . W_k LN(h_i) / (sqrt(d_k) tau)) per head,
    checked against a numpy reimplementation, and each head's weights sum to 1 over the tokens."""
    tokens = _tokens((2, 12, 16), seed=2)
    key_size, tau = 8, 0.5
    awd = AWDHead(num_heads=num_heads, key_size=key_size, width=32, temperature=tau)
    params = _init(awd, tokens, seed=3)
    params = dict(params, query=3.0 * _tokens(params["query"].shape, seed=4))
    logits, weights = _apply(awd, params, tokens)
    w = np.asarray(weights)
    assert w.shape == (2, 12, num_heads) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert float(_entropy(weights)) < 0.95  # no longer uniform

    normed = _layer_norm(tokens, params["key_norm"]["scale"], params["key_norm"]["bias"])
    keys = (normed @ np.asarray(params["key"]["kernel"], np.float64)).reshape(2, 12, num_heads, key_size)
    scores = np.einsum("bnhk,hk->bnh", keys, np.asarray(params["query"], np.float64)) / (math.sqrt(key_size) * tau)
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_output(logits, weights),
                               (expected * np.asarray(logits)).sum(axis=1).mean(axis=-1), rtol=1e-4, atol=1e-6)


def test_weight_entropy_normalised_between_one_hot_and_uniform():
    n = 8
    uniform = np.full((4, n, 2), 1.0 / n, np.float32)
    one_hot = np.zeros((4, n, 2), np.float32)
    one_hot[:, 3, :] = 1.0
    two = np.zeros((4, n, 2), np.float32)
    two[:, :2, :] = 0.5
    np.testing.assert_allclose(_entropy(uniform), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_entropy(one_hot), 0.0, atol=1e-6)
    np.testing.assert_allclose(_entropy(two), math.log(2) / math.log(n), rtol=1e-5)
    # Averaged over examples and heads: one uniform head and one one-hot head give 1/2.
    mixed = np.concatenate([uniform[..., :1], one_hot[..., :1]], axis=-1)
    np.testing.assert_allclose(_entropy(mixed), 0.5, rtol=1e-6)


# A planted local defect: "real" sets are N tokens from A = N(0, I_8); a "fake" set is the same except one token
# at a random position, drawn from B = A shifted by SHIFT along one coordinate. Each token is otherwise
# statistically identical (same variance, and LayerNorm removes any per-token offset or scale).
DIM, SHIFT, TRAIN_TOKENS, BATCH, STEPS, LR = 8, 5.0, 16, 32, 300, 1e-2


def _planted_sets(rng, shape, num_tokens):
    """Real and fake token sets of shape [*shape, num_tokens, DIM] and each fake set's outlier position."""
    real = rng.standard_normal((*shape, num_tokens, DIM))
    fake = rng.standard_normal((*shape, num_tokens, DIM))
    position = rng.integers(0, num_tokens, shape)
    outlier = rng.standard_normal((*shape, DIM))
    outlier[..., 0] += SHIFT
    np.put_along_axis(fake, position[..., None, None], outlier[..., None, :], axis=-2)
    return real.astype(np.float32), fake.astype(np.float32), position


def _train_and_evaluate(head, seed):
    """Adam on the non-saturating discriminator loss; then accuracy and the mean weight on the outlier on fresh
    sets with the training token count and with 4x as many tokens (a larger image, the same defect). The sets
    are drawn with numpy: jax.random on these shapes costs seconds of compilation."""
    rng = np.random.default_rng(seed)
    train_real, train_fake, _ = _planted_sets(rng, (STEPS, BATCH), TRAIN_TOKENS)
    output = lambda p, x: discriminator_output(*head.apply({"params": p}, x))
    optimizer = optax.adam(LR)

    def train(key, real_batches, fake_batches):
        params = head.init(key, real_batches[0])["params"]

        def body(carry, batch):
            p, s = carry
            grads = jax.grad(lambda q: discriminator_loss(output(q, batch[0]), output(q, batch[1]))[0])(p)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(body, (params, optimizer.init(params)), (real_batches, fake_batches))[0][0]

    def evaluate(params, real, fake, position):
        accuracy = 0.5 * (jnp.mean(output(params, real) > 0) + jnp.mean(output(params, fake) < 0))
        _, weights = head.apply({"params": params}, fake)
        return accuracy, jnp.mean(jnp.take_along_axis(weights[..., 0], position[:, None], axis=1))

    params = _quick_jit(train, jax.random.PRNGKey(seed), train_real, train_fake)
    return {n: tuple(float(v) for v in _quick_jit(evaluate, params, *_planted_sets(rng, (2000,), n)))
            for n in (TRAIN_TOKENS, 4 * TRAIN_TOKENS)}


def test_awd_attends_to_a_planted_outlier_that_gap_averages_away():
    """Thresholds, from seeds 0-4 measured when this test was written (AWD | GAP): mean weight on the outlier
    at 16 tokens 0.74-0.79 | 1/16 by construction; accuracy at 16 tokens 0.867-0.881 | 0.834-0.867 (GAP's mean of
    per-token logits can express the likelihood ratio of this task, so equal accuracy at the training size is
    expected); accuracy at 64 tokens 0.755-0.791 | 0.518-0.621, per-seed margin 0.17-0.24: GAP's evidence of one
    defect is diluted 4x by the mean, AWD's attention still finds it (weight 0.40-0.48 vs uniform 1/64).
    Asserted with margins: weight > 0.5 (8x uniform), accuracy >= 0.8 (AWD) and >= 0.75 (GAP) at 16 tokens, and
    at 64 tokens AWD >= 0.7 and at least 0.1 above GAP, with weight > 8/64 on the outlier."""
    awd = _train_and_evaluate(AWDHead(num_heads=1, key_size=16, width=32), seed=0)
    gap = _train_and_evaluate(GAPHead(width=32), seed=0)
    (awd_acc, awd_weight), (awd_acc_big, awd_weight_big) = awd[TRAIN_TOKENS], awd[4 * TRAIN_TOKENS]
    (gap_acc, gap_weight), (gap_acc_big, _) = gap[TRAIN_TOKENS], gap[4 * TRAIN_TOKENS]
    assert awd_weight > 0.5, awd
    assert awd_weight_big > 1.0 / (4 * TRAIN_TOKENS) * 8, awd  # still far from uniform on the bigger set
    np.testing.assert_allclose(gap_weight, 1.0 / TRAIN_TOKENS, rtol=1e-6)
    assert awd_acc >= 0.8 and gap_acc >= 0.75, (awd, gap)  # both learnt the task at the training size
    assert awd_acc_big >= 0.7 and awd_acc_big >= gap_acc_big + 0.1, (awd, gap)


def test_conv_head_shapes_locality_and_square_grid():
    head = ConvHead(width=16)
    tokens = _tokens((2, 16, 8), seed=5)
    params = _random_params(head, tokens)
    logits, weights = _apply(head, params, tokens)
    assert logits.shape == weights.shape == (2, 16, 1)
    np.testing.assert_allclose(weights, 1.0 / 16)
    assert _output(logits, weights).shape == (2,)
    # Tokens are laid out row-major on the 4x4 grid and the 3x3 conv sees neighbours only: changing token 5
    # (row 1, col 1) changes the logits of its 3x3 neighbourhood and nothing else.
    changed, _ = _apply(head, params, tokens.at[:, 5].set(_tokens((2, 8), seed=8)))
    moved = np.any(np.abs(np.asarray(changed - logits)) > 1e-6, axis=(0, 2))
    neighbourhood = {r * 4 + c for r in range(3) for c in range(3)}
    assert set(np.flatnonzero(moved)) == neighbourhood
    for n in (6, 15):
        with pytest.raises(ValueError, match="square token grid"):
            jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((1, n, 8)))


def test_build_head_names_and_rejects_unknown():
    assert isinstance(build_head("awd", weighting="logit"), AWDHead)
    assert isinstance(build_head("gap"), GAPHead) and isinstance(build_head("conv"), ConvHead)
    with pytest.raises(ValueError, match="'mlp'"):
        build_head("mlp")
    with pytest.raises(ValueError, match="weighting 'max'"):
        jax.eval_shape(AWDHead(weighting="max").init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 8)))


def test_logit_weighting_targets_the_most_fake_token_without_gradient_through_weights():
    tau = 0.5
    head = AWDHead(weighting="logit", temperature=tau, width=32)
    tokens = _tokens((4, 9, 8), seed=6)
    params = _init(head, tokens, seed=7)
    # Spread the logits (lowest-to-next gaps 0.7-10) so the weighting is far from uniform.
    params = jax.tree.map(lambda p: p, params)
    params["logits"]["fc2"]["kernel"] = params["logits"]["fc2"]["kernel"] * 20.0

    _, critic_weights = _apply(head, params, tokens)
    np.testing.assert_allclose(critic_weights, 1.0 / 9, rtol=1e-6)  # the critic itself pools uniformly
    logits, weights = _apply(head, params, tokens, for_generator=True)
    l, w = np.asarray(logits[..., 0]), np.asarray(weights[..., 0])
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    expected = np.exp(-(l - l.min(axis=1, keepdims=True)) / tau)
    np.testing.assert_allclose(w, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    # The lowest (most "fake") logit gets the largest weight, and weights fall as logits rise.
    np.testing.assert_array_equal(np.argmax(w, axis=1), np.argmin(l, axis=1))
    np.testing.assert_array_equal(np.argsort(w, axis=1), np.argsort(-l, axis=1))
    assert np.all(w.max(axis=1) > 0.5)  # concentrated (0.75-1.0 here; uniform would be 1/9)

    # No gradient through the weights: d D / d params equals the gradient with the weights held constant.
    def d_sum(p, x):
        return jnp.sum(discriminator_output(*head.apply({"params": p}, x, for_generator=True)))

    def held(p, x):
        lg, _ = head.apply({"params": p}, x, for_generator=True)
        return jnp.sum(lg * weights)

    def through(p, x):  # what a head that let gradients through the weighting would give
        lg, _ = head.apply({"params": p}, x, for_generator=True)
        return jnp.sum(lg * jax.nn.softmax(-lg / tau, axis=1))

    grads, expected, other = _quick_jit(
        lambda p, x: [jax.grad(f, argnums=(0, 1))(p, x) for f in (d_sum, held, through)], params, tokens)
    for got, want, alt in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), jax.tree.leaves(other)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other)))
    assert difference > 1e-3  # the check above can tell the two apart
