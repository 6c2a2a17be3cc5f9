"""AWD heat maps (hd.eval.heatmaps) and readable grids (hd.visualize): token weights are distributions over
tokens, maps have the image's shape, a query aimed at one token puts the maximum on that token's patch, and a
refine checkpoint's head is read back and rendered as computed from the state that was saved."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from hd import visualize
from hd.eval import heatmaps
from hd.models import build_model, init_params, model_depth
from hd.models.heads import AWDHead

DATA_SHAPE = (28, 28, 1)


def _tiny_model():
    config = load_config("fashion_mnist", "refine_tiny")
    model = build_model(config.model, DATA_SHAPE, config.data.num_classes)
    return config, model, jax.jit(lambda key: init_params(model, key, DATA_SHAPE))(jax.random.PRNGKey(0))


def _with_query(head_params, key):
    """A learned query away from zero (a fresh head pools uniformly): the weights then depend on the tokens."""
    params = jax.tree.map(jnp.array, head_params)
    params["query"] = 3.0 * jax.random.normal(key, params["query"].shape)
    return params


def test_token_weights_sum_to_one_and_maps_have_the_image_shape():
    config, model, params = _tiny_model()
    block = model_depth(config.model) // 2
    samples = jax.random.uniform(jax.random.PRNGKey(1), (4, *DATA_SHAPE), minval=-1, maxval=1)
    labels = jnp.arange(4) % 10
    _, tokens = jax.eval_shape(lambda: model.apply({"params": params}, samples, jnp.zeros(4), jnp.zeros(4), labels,
                                                   return_tokens_at=block))
    tokens = jnp.zeros(tokens.shape)
    head = AWDHead(weighting="attention", num_heads=2, width=16, key_size=8)
    head_params = _with_query(head.init(jax.random.PRNGKey(2), tokens)["params"], jax.random.PRNGKey(3))

    weights = heatmaps.awd_token_weights(model, head, params, head_params, samples, labels, feature_block=block)
    assert sorted(weights) == ["attention", "logit"]
    num_tokens = tokens.shape[1]  # 28 / patch 7 = a 4 x 4 grid
    for name, w in weights.items():
        chex.assert_shape(w, (4, num_tokens))
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5, err_msg=name)
        assert np.all(w > 0)
        assert np.ptp(w, axis=1).min() > 0, f"{name} weights are uniform: the test would not see a wrong map"

    maps = visualize.token_heatmaps(weights["attention"], DATA_SHAPE[:2])
    chex.assert_shape(maps, (4, 28, 28))
    side = int(np.sqrt(num_tokens))
    patch = 28 // side
    for k in range(num_tokens):  # each token's weight covers its patch, row-major like the DiT's patches
        r, c = divmod(k, side)
        np.testing.assert_array_equal(maps[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch],
                                      np.broadcast_to(weights["attention"][:, k, None, None], (4, patch, patch)))
    chex.assert_shape(visualize.heatmap_overlay(np.asarray(samples), maps / maps.max()), (4, 28, 28, 3))

    grid = heatmaps.awd_heatmap_grid(np.asarray(samples), weights, rows=2, upscale=3)
    panel = 2 * (3 * 28 + 1) + 1  # two rows and two columns of 84-pixel images, 1-pixel padding
    assert grid.dtype == np.uint8 and grid.shape == (panel, 3 * panel + 2 * 4, 3)
    # The two heat panels differ from the plain samples and from each other.
    panels = [grid[:, i * (panel + 4): i * (panel + 4) + panel] for i in range(3)]
    assert not np.array_equal(panels[0], panels[1]) and not np.array_equal(panels[1], panels[2])


@pytest.mark.parametrize("target", [0, 5, 15])
def test_a_query_aimed_at_one_token_puts_the_maximum_on_its_patch(target):
    tokens = jax.random.normal(jax.random.PRNGKey(target), (1, 16, 8))
    head = AWDHead(weighting="attention", num_heads=1, key_size=8, width=16)
    params = jax.tree.map(jnp.array, head.init(jax.random.PRNGKey(0), tokens)["params"])
    # W_k = identity and q = LN(h_target): the score q . LN(h_i) peaks at i = target (Cauchy-Schwarz: LN
    # outputs share one norm, and no other token normalises to the same vector).
    params["key"]["kernel"] = jnp.eye(8)
    normed = (tokens[0, target] - tokens[0, target].mean()) / jnp.sqrt(tokens[0, target].var() + 1e-6)
    params["query"] = 4.0 * normed[None]
    _, weights = head.apply({"params": params}, tokens)
    w = np.asarray(weights[..., 0])
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    assert int(np.argmax(w[0])) == target and w[0, target] > 2 / 16

    heat = visualize.token_heatmaps(w, (28, 28))[0]
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert (row // 7, col // 7) == divmod(target, 4)
    assert heat[row, col] == pytest.approx(w[0].max())


def test_image_grid_upscale_and_bad_inputs():
    images = np.linspace(-1, 1, 2 * 3 * 3).reshape(2, 3, 3, 1).astype(np.float32)
    plain = visualize.image_grid(images, rows=1)
    assert plain.shape == (5, 9, 1)  # default unchanged: 1 + 3 + 1 rows, 1 + 2 * (3 + 1) columns
    np.testing.assert_array_equal(visualize.image_grid(images, rows=1, upscale=1), plain)
    big = visualize.image_grid(images, rows=1, upscale=3)
    assert big.shape == (1 + 9 + 1, 1 + 2 * (9 + 1), 1)
    first = visualize.to_uint8(images[0])
    np.testing.assert_array_equal(big[1:10, 1:10], np.repeat(np.repeat(first, 3, axis=0), 3, axis=1))
    np.testing.assert_array_equal(visualize.image_grid(visualize.to_uint8(images), rows=1), plain)  # uint8 as is

    with pytest.raises(ValueError, match="upscale factor 0 must be a positive integer"):
        visualize.image_grid(images, rows=1, upscale=0)
    with pytest.raises(ValueError, match="15 token weights do not tile a 28x28 image"):
        visualize.token_heatmaps(np.full((1, 15), 1 / 15), (28, 28))
    with pytest.raises(ValueError, match="9 token weights do not tile a 28x28 image"):
        visualize.token_heatmaps(np.full((1, 9), 1 / 9), (28, 28))


def test_heatmaps_of_a_saved_refine_run(tmp_path):
    from hd.checkpoint import Checkpointer
    from hd.train.loop import config_text
    from hd.train.stages import refine_stage, student_from_teacher

    config, model, teacher = _tiny_model()
    stage = refine_stage(config, DATA_SHAPE, teacher, student_from_teacher(teacher))
    state = jax.jit(stage.init_state)(jax.random.PRNGKey(4))
    critic = dict(state.critic_params, head=_with_query(state.critic_params["head"], jax.random.PRNGKey(5)))
    critic["fake_score"] = jax.tree.map(lambda a: a * 1.1, critic["fake_score"])  # not the teacher's weights
    state = state.replace(critic_params=critic)
    workdir = str(tmp_path / "refine")
    checkpointer = Checkpointer(workdir, keep=1)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.wait()
    checkpointer.close()
    (tmp_path / "refine" / "config.json").write_text(config_text(config, {}))

    samples = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (4, *DATA_SHAPE), minval=-1, maxval=1))
    labels = np.arange(4) % 10
    grid = heatmaps.run_heatmap_grid(workdir, samples, labels, rows=2)
    head = AWDHead(weighting=config.refine.awd_weighting, num_heads=config.refine.awd_heads,
                   temperature=config.refine.awd_temperature, width=config.refine.head_width)
    expected = heatmaps.awd_heatmap_grid(samples, heatmaps.awd_token_weights(
        model, head, critic["fake_score"], critic["head"], samples, labels,
        feature_block=model_depth(config.model) // 2), rows=2)
    np.testing.assert_array_equal(grid, expected)

    # A run without an AWD head (or not a refine run) has no heat map.
    gap = config_text(load_config("fashion_mnist", "refine_tiny", {"refine.gan_head": "gap"}), {})
    (tmp_path / "refine" / "config.json").write_text(gap)
    assert heatmaps.run_heatmap_grid(workdir, samples, labels, rows=2) is None
    assert heatmaps.run_heatmap_grid(str(tmp_path / "nothing_here"), samples, labels, rows=2) is None
