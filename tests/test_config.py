"""Config checks: every error names the key and value, and a failing run leaves an existing work directory
exactly as it was."""

from __future__ import annotations

import re
import shutil
import time

import pytest
from conftest import TOY_RUN, load_config, run_main, tree_snapshot

from hd.config import validate


# --- validate -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,variant", [("toy2d", "teacher"), ("toy2d", "tiny"), ("fashion_mnist", "teacher"),
                                          ("fashion_mnist", "tiny"), ("fashion_mnist", "S"),
                                          ("fashion_mnist", "quality")])
def test_shipped_configs_validate(name, variant):
    config = load_config(name, variant)
    validate(config, num_devices=1)
    validate(config, num_devices=8 if config.batch_size % 8 == 0 else 1)


def test_quality_profile_trains_longer_and_scores_refine_with_the_evaluation_classifier(tmp_path):
    from hd.config import check_values
    from hd.eval.classifier import recipe
    from hd.pipeline import TRAINED, stage_configs

    default = stage_configs("configs/fashion_mnist.py", str(tmp_path), "default")
    quality = stage_configs("configs/fashion_mnist.py", str(tmp_path), "quality")
    for stage in TRAINED:
        check_values(quality[stage], num_devices=1)
        assert quality[stage].num_steps > default[stage].num_steps
        assert quality[stage].batch_size == default[stage].batch_size
    refine, ev = quality["refine"], quality["eval"]
    assert refine.eval_every > 0 and refine.num_steps % refine.eval_every == 0
    # One classifier cache serves the in-training scores and the evaluation: same data config and recipe.
    key = lambda c: (c.data.to_dict(), recipe(c.data, num_steps=c.eval.classifier_steps, batch_size=128, seed=0))
    assert key(refine) == key(ev) and refine.eval.num_samples == ev.eval.num_samples
    assert max(ev.eval.teacher_euler_steps) >= 64 and ev.eval.teacher_heun_steps


@pytest.mark.parametrize("num_devices", [3, 5, 32])
def test_batch_size_must_divide_over_devices(num_devices):
    config = load_config("fashion_mnist", "tiny")  # batch 16
    with pytest.raises(ValueError, match=rf"config\.batch_size=16 does not divide over {num_devices} devices"):
        validate(config, num_devices=num_devices)


@pytest.mark.parametrize("data,fsdp,devices,message", [
    (0, 1, 1, r"config\.mesh=\(data=0, fsdp=1\): each axis is a positive size or -1"),
    (-1, -1, 8, r"config\.mesh=\(data=-1, fsdp=-1\): .*at most one is -1"),
    (-2, 1, 1, r"config\.mesh=\(data=-2, fsdp=1\)"),
    (3, -1, 8, r"config\.mesh=\(data=3, fsdp=-1\) does not fit 8 devices"),
    (2, 2, 8, r"config\.mesh=\(data=2, fsdp=2\) does not fit 8 devices"),
    (16, -1, 8, r"config\.mesh=\(data=16, fsdp=-1\) does not fit 8 devices"),
])
def test_bad_mesh(data, fsdp, devices, message):
    config = load_config("fashion_mnist", "tiny", {"mesh.data": data, "mesh.fsdp": fsdp})
    with pytest.raises(ValueError, match=message):
        validate(config, num_devices=devices)


@pytest.mark.parametrize("data,fsdp", [(2, 4), (-1, 4), (8, -1), (1, -1)])
def test_good_mesh(data, fsdp):
    validate(load_config("fashion_mnist", "tiny", {"mesh.data": data, "mesh.fsdp": fsdp}), num_devices=8)


@pytest.mark.parametrize("key,value", [
    ("batch_size", 0), ("num_steps", 0), ("log_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0),
    ("optimizer.lr", 0.0), ("max_consecutive_skips", 0), ("sample.num_steps", 0), ("sample.per_class", 0),
    ("data.num_classes", 0), ("model.patch_size", 0), ("model.width", 0), ("model.depth", 0), ("num_steps", -5),
])
def test_zero_or_negative_values_name_the_key(key, value):
    config = load_config("toy2d", "tiny", {key: value})
    with pytest.raises(ValueError, match=re.escape(f"config.{key}={value!r} must be > 0")):
        validate(config, num_devices=1)


@pytest.mark.parametrize("overrides,message", [
    ({"stage": "distill"}, "config.stage='distill' is not one of"),
    ({"ema_decay": 1.0}, "config.ema_decay=1.0 must be in [0, 1)"),
    ({"optimizer.warmup_steps": -1}, "config.optimizer.warmup_steps"),
    ({"sample_every": -1}, "config.sample_every"),
    ({"data.name": "imagenet"}, "config.data.name='imagenet' is not one of"),
    ({"model.name": "unet"}, "config.model.name='unet' is not one of"),
    ({"model.name": "dit"}, "config.model.name='dit' does not fit config.data.name='toy2d'"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ({"sample.method": "rk4"}, "config.sample.method='rk4'"),
    ({"teacher.time_sampling": "beta"}, "config.teacher.time_sampling='beta'"),
    ({"teacher.label_dropout": 1.0}, "config.teacher.label_dropout=1.0"),
    ({"sharding_rules": ((".*", "shard"),)}, "rule 'shard' for '.*'"),
    ({"stage": "sketch", "sketch.target": "data", "sketch.fraction_r_neq_t": 0.25, "sketch.fraction_one_step": 0.5},
     "config.sketch.fraction_one_step=0.5 must be in [0, fraction_r_neq_t=0.25]"),
])
def test_bad_values_name_the_key(overrides, message):
    config = load_config("toy2d", "tiny", overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(config, num_devices=1)


def test_image_config_checks():
    with pytest.raises(ValueError, match=re.escape("config.model.size='XXL' is not one of")):
        validate(load_config("fashion_mnist", "tiny", {"model.size": "XXL"}), num_devices=1)
    with pytest.raises(ValueError, match=re.escape("config.data.name='tfds' needs config.data.tfds_name")):
        validate(load_config("fashion_mnist", "tiny", {"data.name": "tfds"}), num_devices=1)


# --- the locked schema ----------------------------------------------------------------------


def test_locked_config_rejects_unknown_keys_and_wrong_types():
    config = load_config("toy2d", "tiny")
    with pytest.raises(AttributeError, match="nonexistent"):
        config.model.nonexistent = 1
    with pytest.raises(KeyError, match="nonexistent"):
        load_config("toy2d", "tiny", {"optimizer.nonexistent": 1})
    with pytest.raises(TypeError, match="'batch_size'"):
        config.batch_size = "abc"
    with pytest.raises(TypeError, match="'batch_size'"):
        config.batch_size = 1.5  # no silent truncation of a float into an int field
    with pytest.raises(TypeError, match="'lr'"):
        config.optimizer.lr = "fast"
    config.optimizer.lr = 1  # an int widens to the float field
    assert isinstance(config.optimizer.lr, float)


def test_unknown_config_variant_is_named():
    with pytest.raises(ValueError, match="no variant 'huge'"):
        load_config("toy2d", "huge")


# --- command line and work directory ---------------------------------------------------------


@pytest.fixture
def previous_workdir(tmp_path):
    """A work directory with a previous run's config.json and a file of the user's."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"previous": true}\n')
    (workdir / "notes.txt").write_text("sentinel\n")
    return workdir


@pytest.mark.parametrize("flag,names", [
    ("--config.model.nonexistent=1", ["nonexistent"]),
    ("--config.batch_size=abc", ["config.batch_size", "abc"]),
    ("--config.optimizer.lr=fast", ["config.optimizer.lr", "fast"]),
])
def test_command_line_errors_name_the_key(flag, names, previous_workdir, tmp_path):
    before = tree_snapshot(previous_workdir)
    for workdir in (previous_workdir, tmp_path / "new"):
        result = run_main("toy2d.py:tiny", workdir, flag, timeout=60)
        assert result.returncode != 0
        for name in names:
            assert name in result.stderr, result.stderr[-2000:]
    assert tree_snapshot(previous_workdir) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("overrides,devices,message", [
    ({"batch_size": 0}, 1, "config.batch_size=0"),
    ({"batch_size": 60}, 8, "config.batch_size=60 does not divide over 8 devices"),
    ({"mesh.data": 0}, 1, "config.mesh=(data=0"),
    ({"model.name": "dit"}, 1, "config.model.name='dit'"),
])
def test_failing_run_leaves_workdir_untouched(overrides, devices, message, previous_workdir, tmp_path,
                                              monkeypatch):
    from hd.train import loop

    monkeypatch.setattr(loop.jax, "device_count", lambda: devices)  # what validate sees
    config = load_config("toy2d", "tiny", overrides)
    before = tree_snapshot(previous_workdir)
    for workdir in (previous_workdir, tmp_path / "new"):
        with pytest.raises(ValueError, match=re.escape(message)):
            loop.train(config, str(workdir))
    assert tree_snapshot(previous_workdir) == before
    assert (previous_workdir / "config.json").read_text() == '{"previous": true}\n'
    assert not (tmp_path / "new").exists()


def test_missing_dataset_fails_fast_without_writing(previous_workdir, tmp_path):
    from hd.train.loop import train

    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    config = load_config("fashion_mnist", "tiny", {"data.name": "tfds", "data.tfds_name": "hd_not_prepared",
                                                   "data.data_dir": str(data_dir)})
    before = tree_snapshot(previous_workdir)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'hd_not_prepared' is not prepared in data_dir=" + re.escape(
            str(data_dir))):
        train(config, str(previous_workdir))
    assert time.monotonic() - start < 10  # no download attempt (those retry for minutes offline)
    assert tree_snapshot(previous_workdir) == before
    assert list(data_dir.iterdir()) == []


def test_patch_size_that_does_not_tile_fails_before_writing(previous_workdir, fake_fashion_dirs):
    """A value that only fails when the model is built (patch 5 on 28x28 images) still fails before the work
    directory is touched."""
    from hd.train.loop import train

    idx_dir, data_dir = fake_fashion_dirs
    config = load_config("fashion_mnist", "tiny", {"model.patch_size": 5, "data.idx_dir": idx_dir,
                                                   "data.data_dir": data_dir})
    before = tree_snapshot(previous_workdir)
    with pytest.raises(ValueError, match=re.escape("patch_size=5 does not tile 28x28")):
        train(config, str(previous_workdir))
    assert tree_snapshot(previous_workdir) == before


def test_changed_architecture_does_not_clobber_a_run(toy_run, tmp_path):
    """Resuming a finished run with a different model fails on restore, and the run (checkpoints, config.json,
    logs, samples) stays exactly as it was."""
    from hd.train.loop import train

    workdir = tmp_path / "work"
    shutil.copytree(toy_run[0], workdir)
    before = tree_snapshot(workdir)
    config_json = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match=r"(?i)shape"):
        train(load_config("toy2d", "tiny", dict(TOY_RUN, **{"model.width": 32})), str(workdir))
    assert tree_snapshot(workdir) == before
    assert (workdir / "config.json").read_text() == config_json


@pytest.fixture(scope="module")
def fake_fashion_dirs(tmp_path_factory):
    """Gzipped IDX files of a few random 28x28 images (the Debian package's format), and a TFDS dir."""
    import gzip
    import struct

    import numpy as np

    idx_dir = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 32), ("t10k", 16)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(idx_dir / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return str(idx_dir), str(tmp_path_factory.mktemp("tfds"))
