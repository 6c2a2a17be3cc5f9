"""Tests for hd.tools.import_teacher against tests/fixtures/sit_tiny (written by `python -m
hd.tools.make_fixtures --only=sit` with PyTorch; CI reads it without torch).

The fixture is a SiT-structured PyTorch network at hd's tiny size (hidden 32, depth 2, patch 2, 8x8x4 inputs,
10 classes + null, learn_sigma=True) with every weight random, and its outputs v_SiT(z, 1 - t, y) (all 2C
channels). The imported teacher must give v_hd(z, t, y) = -v_SiT(z, 1 - t, y)[..., :C].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, complete_checkpoints, load_config, subprocess_env, tree_snapshot
from hd import flow
from hd.models import average_velocity_apply, build_model, velocity_apply
from hd.models.dit import timestep_frequencies
from hd.tools.import_teacher import (TeacherImportError, convert_sit, import_teacher, read_state_dict,
                                     time_flip_matrix, timestep_frequencies_np)

FIXTURE = REPO / "tests" / "fixtures" / "sit_tiny"
SAFETENSORS = FIXTURE / "sit_tiny.safetensors"
NESTED_PT = FIXTURE / "sit_tiny_nested.pt"
SHAPE, NUM_CLASSES, C = (8, 8, 4), 10, 4
# The fixture's architecture as overrides of the real ImageNet teacher config (float32: the comparison is exact
# up to rounding; bfloat16 is the TPU compute setting).
TINY = {"model.size": "tiny", "model.patch_size": 2, "model.dtype": "float32", "data.num_classes": NUM_CLASSES,
        "data.example_shape": SHAPE}
RTOL = 1e-4  # max |error| relative to the output's rms
try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def teacher_config(**extra):
    return load_config("imagenet256", "teacher", {**TINY, **extra})


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def sit_state():
    return read_state_dict(str(SAFETENSORS))[0]


@pytest.fixture(scope="module")
def apply():
    """The tiny teacher's velocity (params, z, t, y) -> v, compiled once for every test here."""
    return jax.jit(velocity_apply(build_model(teacher_config().model, SHAPE, NUM_CLASSES)))


@pytest.fixture(scope="module")
def imported(sit_state, apply):
    """(params, apply) of the fixture imported with the official SiT convention."""
    params, dropped = convert_sit(sit_state, teacher_config())
    assert dropped == []
    return params, apply


def relative_error(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.sqrt(np.mean(ref ** 2)))


# --- The fold ---------------------------------------------------------------------------------------------------

def test_time_flip_matrix_maps_features_of_t_to_features_of_one_minus_t():
    """features(1 - t) = features(t) @ R exactly (float64), R is its own inverse, and hd's float32 features
    agree with it to float32 rounding."""
    dim = 256
    r = time_flip_matrix(dim)
    w = timestep_frequencies_np(dim).astype(np.float64)  # the frequencies R is built from
    t = np.concatenate([np.linspace(0.0, 1.0, 101), [1e-6, 0.999999]])
    feats = lambda s: np.concatenate([np.cos(s[:, None] * w), np.sin(s[:, None] * w)], axis=1)
    np.testing.assert_allclose(feats(t) @ r, feats(1.0 - t), atol=1e-13)
    np.testing.assert_allclose(r @ r, np.eye(dim), atol=1e-13)
    hd_feats = np.asarray(timestep_frequencies(jnp.asarray(t, jnp.float32), dim), np.float64)
    assert np.max(np.abs(hd_feats - feats(t.astype(np.float32).astype(np.float64)))) < 1e-6
    assert np.max(np.abs(hd_feats @ r - feats(1.0 - t))) < 1e-5
    assert np.max(np.abs(feats(t) - feats(1.0 - t))) > 0.5  # the flip is not the identity


# --- Against the PyTorch outputs ----------------------------------------------------------------------------------

def test_velocity_matches_sit_at_every_t_with_labels_and_null(imported, io):
    params, apply = imported
    v = np.asarray(apply(params, jnp.asarray(io["z"]), jnp.asarray(io["t"]), jnp.asarray(io["y"])))
    ref = -io["v_sit"][..., :C]
    assert (io["y"] == NUM_CLASSES).sum() == len(io["y"]) // 2  # half the rows carry the null class
    errors = [relative_error(v[i], ref[i]) for i in range(len(ref))]
    assert max(errors) < RTOL, dict(zip(io["t"].tolist(), errors))
    assert np.isclose(io["t"], 0.0).any() and np.isclose(io["t"], 1.0).any() and (io["t"] == np.float32(0.999)).any()


def test_guided_velocity_matches_the_same_combination_of_sit_outputs(imported, io):
    params, apply = imported
    k = len(io["t"]) // 2  # rows i and i + k: same z and t, class label vs null
    velocity = lambda z, t, y: apply(params, z, t, y)
    scale = 1.5
    guided = flow.guided_velocity(velocity, NUM_CLASSES, scale)(
        jnp.asarray(io["z"][:k]), jnp.asarray(io["t"][:k]), jnp.asarray(io["y"][:k]))
    cond, null = io["v_sit"][:k, ..., :C], io["v_sit"][k:, ..., :C]
    ref = -(null + scale * (cond - null))
    assert relative_error(guided, ref) < RTOL
    assert relative_error(guided, -cond) > 0.05  # guidance changed something: the check has teeth


def test_without_the_fold_the_velocity_is_wrong(sit_state, io, apply):
    """--convention=repa copies the weights unchanged: right only if the file already uses hd's time and sign
    (here it does not), and then it equals SiT at the same time argument."""
    params, _ = convert_sit(sit_state, teacher_config(), convention="repa")
    z, y = jnp.asarray(io["z"]), jnp.asarray(io["y"])
    assert relative_error(apply(params, z, jnp.asarray(io["t"]), y), -io["v_sit"][..., :C]) > 0.5
    assert relative_error(apply(params, z, jnp.asarray(io["t_sit"]), y), io["v_sit"][..., :C]) < RTOL


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_layer_keeps_the_velocity_channels_of_each_patch_position(sit_state, learn_sigma):
    """The official output rows are ordered (row in patch, column in patch, channel) with 2C channels per
    position; learn_sigma=False keeps channels [0, C) of each position, True keeps all 2C. Both negated."""
    params, _ = convert_sit(sit_state, teacher_config(**{"model.learn_sigma": learn_sigma}))
    kernel, bias = params["final_layer"]["linear"]["kernel"], params["final_layer"]["linear"]["bias"]
    weight, stored_bias = sit_state["final_layer.linear.weight"], sit_state["final_layer.linear.bias"]
    kept = 2 * C if learn_sigma else C
    assert kernel.shape == (32, 4 * kept)
    for position in range(4):  # 2 x 2 patch
        for channel in range(kept):
            np.testing.assert_array_equal(kernel[:, position * kept + channel], -weight[position * 2 * C + channel])
            assert bias[position * kept + channel] == -stored_bias[position * 2 * C + channel]


@pytest.mark.skipif(not HAVE_TORCH, reason="reading the .pt fixture needs torch (not in requirements.txt)")
def test_nested_pt_checkpoint_drops_projectors_and_gives_the_same_weights(sit_state):
    state, nested = read_state_dict(str(NESTED_PT))
    assert nested == "ema"
    config = teacher_config()
    params, dropped = convert_sit(state, config)
    assert dropped == ["projectors.0.weight"]
    reference, _ = convert_sit(sit_state, config)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_pt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(TeacherImportError, match="pip install torch"):
        read_state_dict(str(NESTED_PT))


# --- Bad input ----------------------------------------------------------------------------------------------------

def write_safetensors(path: Path, state: dict) -> str:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "misshaped", "unknown", "pos_embed"])
def test_bad_checkpoint_is_an_error_naming_the_key_and_nothing_is_written(tmp_path, sit_state, case):
    state = dict(sit_state)
    if case == "missing":
        del state["blocks.1.mlp.fc2.bias"]
        expected = ["blocks.1.mlp.fc2.bias (32,)", "Missing"]
    elif case == "misshaped":
        state["blocks.0.attn.qkv.weight"] = np.zeros((96, 16), np.float32)
        expected = ["blocks.0.attn.qkv.weight", "(96, 16)", "(96, 32)"]
    elif case == "unknown":  # e.g. qk-norm weights: not droppable without changing the function
        state["blocks.0.attn.q_norm.weight"] = np.ones((16,), np.float32)
        expected = ["blocks.0.attn.q_norm.weight", "Unexpected"]
    else:
        state["pos_embed"] = state["pos_embed"] + 0.5
        expected = ["pos_embed", "sin-cos"]
    checkpoint = write_safetensors(tmp_path / "bad.safetensors", state)
    workdir = tmp_path / "teacher"
    with pytest.raises(TeacherImportError) as info:
        import_teacher(checkpoint, teacher_config(), str(workdir))
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert not workdir.exists()


@pytest.mark.parametrize("overrides, variant, expected", [
    ({"model.size": "mini"}, "teacher", ["hidden 96, depth 4", "hidden 32, depth 2"]),
    ({"data.num_classes": 1000}, "teacher", ["y_embedder.embedding_table.weight", "(11, 32)", "(1001, 32)"]),
    ({"model.time_scale": 1000.0}, "teacher", ["time_scale"]),
    ({}, "sketch", ["stage='sketch'", "teacher variant"]),
])
def test_wrong_config_is_a_clear_error(tmp_path, overrides, variant, expected):
    config = load_config("imagenet256", variant, {**TINY, **overrides})
    workdir = tmp_path / "teacher"
    with pytest.raises(TeacherImportError) as info:
        import_teacher(str(SAFETENSORS), config, str(workdir))
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert not workdir.exists()


def test_dit_format_is_rejected_as_not_supported(tmp_path):
    with pytest.raises(TeacherImportError, match="--format=dit is not supported"):
        import_teacher(str(SAFETENSORS), teacher_config(), str(tmp_path / "t"), format="dit")


def test_existing_workdir_is_never_overwritten(tmp_path):
    workdir = tmp_path / "teacher"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text('{"mine": true}\n')
    before = tree_snapshot(workdir)
    with pytest.raises(TeacherImportError, match=str(workdir)):
        import_teacher(str(SAFETENSORS), teacher_config(), str(workdir))
    assert tree_snapshot(workdir) == before


# --- End to end: import with the command, then a sketch stage from it ---------------------------------------------

def latent_dataset(data_dir: Path, n: int = 32) -> str:
    """A prepared TFDS ArrayRecord dataset of random 8x8x4 float 'latents' with 10 classes (as a user's latent
    dataset would be, under data.image_key='latent')."""
    import tensorflow_datasets as tfds
    from etils import epath

    class SitFixtureLatents(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(__file__)  # TFDS 4.9 on Python 3.11 cannot derive it (see hd/data/fashion_mnist.py)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "latent": tfds.features.Tensor(shape=SHAPE, dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(n):
                yield i, {"latent": rng.standard_normal(SHAPE).astype(np.float32), "label": i % NUM_CLASSES}

    builder = SitFixtureLatents(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.name


def test_import_command_then_sketch_trains_from_the_imported_teacher(tmp_path, io, apply):
    from hd.checkpoint import latest_step
    from hd.train.loop import train
    from hd.train.stages import build_stage, load_ema_params

    teacher_dir = tmp_path / "teacher"
    overrides = [f"--config.{k}={v}" for k, v in TINY.items() if k != "data.example_shape"]
    proc = subprocess.run(
        [sys.executable, "-m", "hd.tools.import_teacher", "--format=sit", f"--checkpoint={SAFETENSORS}",
         f"--config={REPO / 'configs' / 'imagenet256.py'}:teacher", f"--workdir={teacher_dir}",
         "--config.data.example_shape=(8, 8, 4)", *overrides],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((teacher_dir / "config.json").read_text())
    teacher_cfg = teacher_config()
    assert record["stage"] == "teacher" and record["model"]["size"] == "tiny"
    imported_from = record["imported_from"]
    assert imported_from["format"] == "sit" and imported_from["convention"] == "sit"
    assert imported_from["file"] == str(SAFETENSORS) and len(imported_from["sha256"]) == 64
    assert imported_from["sha256"] in proc.stdout and imported_from["dropped_keys"] == []
    assert latest_step(str(teacher_dir)) == teacher_cfg.num_steps == complete_checkpoints(teacher_dir)[-1]

    data_dir = tmp_path / "tfds"
    name = latent_dataset(data_dir)
    plain_latents = {"data.image_key": "latent"}  # stored latents as they are, not VAE posteriors to sample
    if "latent_posterior" in load_config("imagenet256", "sketch").data:
        plain_latents["data.latent_posterior"] = False
    sketch_cfg = load_config("imagenet256", "sketch", {
        **TINY, **plain_latents, "data.tfds_name": name, "data.data_dir": str(data_dir),
        "sketch.teacher_workdir": str(teacher_dir),
        "batch_size": 8, "num_steps": 3, "log_every": 1, "checkpoint_every": 3, "sample_every": 0,
        "optimizer.warmup_steps": 0, "sample.per_class": 1, "model.scan_blocks": False, "model.remat": False})

    # The teacher the sketch stage reads is the fixture's SiT in hd's convention, and at step 0 the student is
    # that teacher at r = t.
    model = build_model(sketch_cfg.model, SHAPE, NUM_CLASSES)
    teacher = load_ema_params(model, SHAPE, str(teacher_dir))
    z, t, y = jnp.asarray(io["z"]), jnp.asarray(io["t"]), jnp.asarray(io["y"])
    v_teacher = apply(teacher, z, t, y)
    assert relative_error(v_teacher, -io["v_sit"][..., :C]) < RTOL
    student = build_stage(sketch_cfg, SHAPE).init_state(jax.random.PRNGKey(0)).params
    u = jax.jit(average_velocity_apply(model))(student, z, t, t, y)
    assert relative_error(u, v_teacher) < 1e-6  # equal up to the summation order of two compiled programs

    sketch_dir = tmp_path / "sketch"
    metrics = train(sketch_cfg, str(sketch_dir))
    assert metrics and all(np.isfinite(v) for v in metrics.values()), metrics
    assert complete_checkpoints(sketch_dir) == [3]
    assert os.listdir(teacher_dir / "checkpoints") == [str(teacher_cfg.num_steps)]  # the teacher is only read
