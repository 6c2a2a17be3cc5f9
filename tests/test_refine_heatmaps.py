"""AWD heat maps inside refine training (hd.train.loop, write_samples): beside every sample grid, an AWD refine run
on images writes samples/step_<step>_awd.png and the TensorBoard image 'awd_heatmaps', computed once per grid from
the live critic with a token-weight function traced once; the final one equals the evaluation's heat map
(hd.eval.heatmaps.run_heatmap_grid) of the final checkpoint; runs without an AWD head write none."""

from __future__ import annotations

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_checkpoint, load_config
from hd.checkpoint import Checkpointer
from hd.eval import heatmaps
from hd.models import build_model, init_params, model_depth
from hd.models.heads import build_head
from hd.train.loop import config_text, grid_inputs, render_samples, train
from hd.train.stages import build_stage, stage_trees
from hd.train.state import TrainState, make_optimizer
from test_data import fake_idx_dir  # noqa: F401  (fixture: 120 + 40 random 28x28 IDX images)

DATA_SHAPE = (28, 28, 1)
NUM_STEPS = 2  # samples at step 1 (sample_every) and at the final step 2


def _data(root, idx_dir) -> dict:
    """A small Fashion-MNIST stand-in, prepared inside the test's directory (not ~/.cache)."""
    return {"data.idx_dir": idx_dir, "data.data_dir": str(root / "tfds")}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, fake_idx_dir):  # noqa: F811
    """A finished tiny teacher written by hand (random parameters): the refine stage only reads its EMA."""
    root = tmp_path_factory.mktemp("refine_heatmaps")
    config = load_config("fashion_mnist", "tiny", _data(root, fake_idx_dir))
    model = build_model(config.model, DATA_SHAPE, config.data.num_classes)
    params = jax.jit(lambda key: init_params(model, key, DATA_SHAPE))(jax.random.PRNGKey(0))
    checkpointer = Checkpointer(str(root / "teacher"), keep=1)
    checkpointer.save(config.num_steps, TrainState.create(params, make_optimizer(config.optimizer)),
                      {"step": config.num_steps})
    checkpointer.close()
    (root / "teacher" / "config.json").write_text(config_text(config, {}))
    return root, fake_idx_dir


def _refine_config(root, idx_dir, **overrides):
    return load_config("fashion_mnist", "refine_tiny", {
        **_data(root, idx_dir), "refine.teacher_workdir": str(root / "teacher"), "refine.generator_init": "teacher",
        "num_steps": NUM_STEPS, "checkpoint_every": NUM_STEPS, "log_every": NUM_STEPS, "sample_every": 1,
        **overrides})


def _image_summaries(workdir) -> dict[tuple[str, int], np.ndarray]:
    """{(tag, step): decoded image} of every image summary in the work directory's TensorBoard events."""
    import io

    import tensorflow as tf

    out = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    png = tf.make_ndarray(value.tensor)[2]  # [width, height, encoded image, ...]
                    out[(value.tag, event.step)] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return out


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_awd_refine_run_writes_heat_maps_that_match_its_checkpoint(teacher_dir, tmp_path, monkeypatch):
    root, idx_dir = teacher_dir
    config = _refine_config(root, idx_dir)
    assert config.refine.gan_head == "awd" and config.refine.awd_weighting == "attention"
    traces = []
    real = heatmaps.token_weights
    monkeypatch.setattr(heatmaps, "token_weights", lambda *a, **k: traces.append(1) or real(*a, **k))
    workdir = str(tmp_path / "refine")
    train(config, workdir)
    # Traced twice in all: the check before the work directory is written, and the one jit the two grids share.
    assert len(traces) == 2
    monkeypatch.setattr(heatmaps, "token_weights", real)

    # Both grids have a heat map beside them: [samples | attention | logit], 10 rows x 2 images at 3x.
    panel = (10 * (3 * 28 + 1) + 1, 2 * (3 * 28 + 1) + 1)
    for step in (1, NUM_STEPS):
        heat = _png(os.path.join(workdir, "samples", f"step_{step:07d}_awd.png"))
        chex.assert_shape(heat, (panel[0], 3 * panel[1] + 2 * 4, 3))
    summaries = _image_summaries(workdir)
    assert {tag for tag, _ in summaries} == {"samples", "awd_heatmaps"}
    assert sorted(step for tag, step in summaries if tag == "awd_heatmaps") == [1, NUM_STEPS]

    # The final heat map is the evaluation's heat map of the final checkpoint on the same grid samples: the live
    # state and the checkpoint path agree.
    state, _ = load_checkpoint(workdir, config, DATA_SHAPE)
    assert int(state.step) == NUM_STEPS
    stage = build_stage(config, DATA_SHAPE)
    noise, labels = grid_inputs(config, DATA_SHAPE)
    samples = np.asarray(jax.jit(stage.sample)(state, stage.frozen, noise, labels))
    expected = heatmaps.run_heatmap_grid(workdir, samples, np.asarray(labels), rows=config.data.num_classes)
    written = _png(os.path.join(workdir, "samples", f"step_{NUM_STEPS:07d}_awd.png"))
    np.testing.assert_array_equal(_png(os.path.join(workdir, "samples", f"step_{NUM_STEPS:07d}.png"))[..., 0],
                                  render_samples(config, samples)[..., 0])  # the same samples
    assert expected.shape == written.shape
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(summaries[("awd_heatmaps", NUM_STEPS)], written)
    # The two heat panels are not the plain samples, and the critic moved between the two grids' steps.
    panels = [written[:, i * (panel[1] + 4): i * (panel[1] + 4) + panel[1]] for i in range(3)]
    assert not np.array_equal(panels[0], panels[1]) and not np.array_equal(panels[0], panels[2])
    assert not np.array_equal(_png(os.path.join(workdir, "samples", "step_0000001_awd.png")), written)


def test_no_heat_maps_without_an_awd_head(teacher_dir, tmp_path):
    """A run without an AWD head writes its samples and no heat map. One run without a head (the cheapest to
    compile) stands for GAP and conv heads too: their stages have no token_weights either (below)."""
    root, idx_dir = teacher_dir
    config = _refine_config(root, idx_dir, **{"refine.gan_head": "none", "num_steps": 1, "checkpoint_every": 1,
                                              "log_every": 1})
    workdir = str(tmp_path / "refine")
    train(config, workdir)
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000001.png"))
    assert not glob.glob(os.path.join(workdir, "samples", "*_awd.png"))
    assert {tag for tag, _ in _image_summaries(workdir)} == {"samples"}


@pytest.mark.parametrize("feature_net", ["fake_score", "teacher"])
def test_stage_token_weights_read_the_configured_feature_net(teacher_dir, feature_net):
    """Stage.token_weights takes its features where the step does: the critic's fake score, or the frozen
    teacher; here the two differ, so reading the wrong one changes the weights."""
    root, idx_dir = teacher_dir
    config = _refine_config(root, idx_dir, **{"refine.feature_net": feature_net})
    trees = stage_trees(config, DATA_SHAPE, "random")
    stage = build_stage(config, DATA_SHAPE, trees)
    state = jax.jit(stage.init_state)(jax.random.PRNGKey(1))
    head = dict(state.critic_params["head"])
    head["query"] = 3.0 * jax.random.normal(jax.random.PRNGKey(2), head["query"].shape)  # not uniform pooling
    fake_score = jax.tree.map(lambda a: 1.1 * a, state.critic_params["fake_score"])  # not the teacher's weights
    state = state.replace(critic_params={"fake_score": fake_score, "head": head})
    samples = jax.random.uniform(jax.random.PRNGKey(3), (4, *DATA_SHAPE), minval=-1, maxval=1)
    labels = jnp.arange(4) % 10

    got = heatmaps.host_weights(jax.jit(stage.token_weights)(state, stage.frozen, samples, labels))
    model = build_model(config.model, DATA_SHAPE, config.data.num_classes)
    rf = config.refine
    awd = build_head("awd", width=rf.head_width, weighting=rf.awd_weighting, num_heads=rf.awd_heads,
                     temperature=rf.awd_temperature)
    for features, match in ((fake_score, feature_net == "fake_score"), (stage.frozen, feature_net == "teacher")):
        want = heatmaps.awd_token_weights(model, awd, features, head, samples, labels,
                                          feature_block=model_depth(config.model) // 2)
        assert sorted(want) == sorted(got) == ["attention", "logit"]
        close = all(np.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in got)
        assert close == match, (feature_net, match)


@pytest.mark.parametrize("name,gan_head,has_weights", [
    ("fashion_mnist", "awd", True), ("fashion_mnist", "gap", False), ("fashion_mnist", "conv", False),
    ("fashion_mnist", "none", False), ("toy2d", "awd", False)])  # 2-D points: no image to draw over
def test_which_refine_stages_have_token_weights(name, gan_head, has_weights):
    config = load_config(name, "refine_tiny", {"refine.gan_head": gan_head, "refine.teacher_workdir": "/teacher",
                                               "refine.sketch_workdir": "/sketch"})
    shape = DATA_SHAPE if name == "fashion_mnist" else (2,)
    stage = build_stage(config, shape, stage_trees(config, shape, "abstract"))
    assert (stage.token_weights is not None) == has_weights
