"""The latent-space pipeline end to end on CPU: a tiny RGB class-folder data set (Fashion-MNIST resized to
32x32 and tinted per class) -> prepare_latents with a tiny random VAE -> teacher -> sketch -> refine on the
8x8x4 posteriors; and a killed prepare_latents that, rerun, ends with exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env

IDX_DIR = "/usr/share/datasets/fashion-mnist"
# A 3-level AutoencoderKL (4x downsampling: 32x32x3 -> 8x8x4) of a few thousand parameters.
TINY_VAE_CONFIG = {"block_out_channels": [8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 3,
                   "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 4,
                   "latent_channels": 4, "in_channels": 3, "out_channels": 3, "sample_size": 32,
                   "scaling_factor": 0.5}
# One colour per class, so the classes differ in colour as well as in shape.
TINTS = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 1.0, 0.3], [1.0, 0.3, 1.0],
                  [0.3, 1.0, 1.0], [1.0, 0.6, 0.2], [0.6, 0.2, 1.0], [0.2, 0.6, 0.6], [0.9, 0.9, 0.9]])


def make_tinted_folder(root, per_class: int) -> np.ndarray:
    """Writes root/class_K/NNNN.png (32x32 RGB) for the first `per_class` Fashion-MNIST training images of each
    class; returns the labels in the source's order (class folder, then file name)."""
    from hd.data.fashion_mnist import read_idx

    if not os.path.isdir(IDX_DIR):
        pytest.skip(f"Fashion-MNIST IDX files not at {IDX_DIR} (apt-get install dataset-fashion-mnist)")
    images = read_idx(os.path.join(IDX_DIR, "train-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(IDX_DIR, "train-labels-idx1-ubyte.gz"))
    out = []
    for k in range(10):
        os.makedirs(os.path.join(root, f"class_{k}"), exist_ok=True)
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
            gray = np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
            rgb = np.clip(gray[..., None] * TINTS[k], 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(os.path.join(root, f"class_{k}", f"{j:04d}.png"))
            out.append(k)
    return np.asarray(out)


def make_tiny_vae(directory: str, seed: int = 0):
    from hd.models.vae import save_vae, vae_from_config

    vae = vae_from_config(TINY_VAE_CONFIG, jax.random.PRNGKey(seed))
    save_vae(vae, directory)
    return vae


def prepare_command(folder, vae_dir, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hd.data.prepare_latents", f"--source=folder:{folder}", f"--vae={vae_dir}",
            f"--out={out}", "--name=tiny_latents", "--resolution=32", *extra]


def _read_split(out: str) -> dict[str, np.ndarray]:
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(os.path.join(out, "tiny_latents", "1.0.0")).as_data_source(split="train")
    examples = source.__getitems__(list(range(len(source))))
    return {k: np.stack([e[k] for e in examples]) for k in ("mean", "std", "label", "index")}


def test_killed_prepare_latents_resumes_to_the_uninterrupted_result(tmp_path):
    folder, vae_dir = tmp_path / "images", str(tmp_path / "vae")
    labels = make_tinted_folder(folder, per_class=6)  # 60 images: 8 shards of 8 (the last one 4)
    make_tiny_vae(vae_dir)
    flags = ("--shard_size=8", "--batch=4", "--workers=2")

    whole = subprocess.run(prepare_command(folder, vae_dir, tmp_path / "whole", *flags), cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # SIGKILL while the 4th shard is being written (after 3 committed), leaving a partial temporary file.
    killed = subprocess.run(prepare_command(folder, vae_dir, tmp_path / "resumed", *flags), cwd=REPO,
                            env=subprocess_env(HD_PREPARE_KILL_AFTER_SHARDS="3"), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    version_dir = tmp_path / "resumed" / "tiny_latents" / "1.0.0"
    assert not (version_dir / "dataset_info.json").exists()  # not visible to the trainer while incomplete
    assert len(list((version_dir / "_prepare" / "train").glob("shard-*.json"))) == 3
    assert list(version_dir.glob("*.tmp.*"))  # the interrupted shard's partial file

    resumed = subprocess.run(prepare_command(folder, vae_dir, tmp_path / "resumed", *flags), cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 shards done earlier" in resumed.stderr and "writes 5 (36 examples)" in resumed.stderr

    a, b = _read_split(str(tmp_path / "whole")), _read_split(str(tmp_path / "resumed"))
    assert len(b["label"]) == len(labels) == 60
    np.testing.assert_array_equal(b["index"], np.arange(60))
    np.testing.assert_array_equal(b["label"], labels)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_latent_pipeline_prepare_teacher_sketch_refine_eval(tmp_path):
    from hd.checkpoint import latest_step
    from hd.data.prepare_latents import prepare
    from hd.eval.inception import init_inception_params, save_inception_params
    from hd.pipeline import stage_configs, stage_dirs
    from hd.train.loop import train

    start = time.perf_counter()
    folder, vae_dir, data_dir = tmp_path / "images", str(tmp_path / "vae"), str(tmp_path / "tfds")
    labels = make_tinted_folder(folder, per_class=4)
    make_tiny_vae(vae_dir)
    inception = str(tmp_path / "inception.pkl")  # random weights: the FID and IS code paths, not their values
    inception_sha = save_inception_params(init_inception_params(0), inception)
    reference = str(tmp_path / "reference.npz")
    summary = prepare(source=f"folder:{folder}", vae_dir=vae_dir, out=data_dir, name="tiny_latents", resolution=32,
                      batch=10, shard_size=20, workers=2, inception_weights=inception,
                      inception_sha256=inception_sha, fid_ref_out=reference)
    assert summary["num_examples"] == len(labels) == 40
    with np.load(reference) as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert np.all(np.isfinite(ref["sigma"])) and np.allclose(ref["sigma"], ref["sigma"].T)
    prepared = time.perf_counter()
    print(f"prepared: {prepared - start:.1f} s")

    overrides = (f"data.data_dir={data_dir}", f"eval.vae_dir={vae_dir}", f"eval.inception_weights={inception}",
                 f"eval.inception_sha256={inception_sha}", f"eval.reference_npz={reference}",
                 f"sample.vae_dir={vae_dir}")  # grids decoded to RGB by the VAE the latents were made with
    workdir = tmp_path / "run"
    configs, dirs = stage_configs(str(REPO / "configs" / "latent_tiny.py"), str(workdir), "default", overrides), \
        stage_dirs(str(workdir))
    for stage in ("teacher", "sketch", "refine"):
        metrics = train(configs[stage], dirs[stage])
        assert metrics and all(np.isfinite(v) for v in metrics.values()), (stage, metrics)
        assert latest_step(dirs[stage]) == 6
        # The final grid: 10 classes x 1 sample of decoded 32x32 RGB images (raw 8x8x4 latents would make a
        # 91x10 RGBA image), 1-pixel padding.
        with Image.open(os.path.join(dirs[stage], "samples", "step_0000006.png")) as png:
            assert png.mode == "RGB", (stage, png.mode)
            grid = np.asarray(png)
        assert grid.shape == (10 * 33 + 1, 33 + 1, 3), (stage, grid.shape)
        assert grid[1:-1, 1:-1].std() > 1.0, stage  # images, not blank padding
        print(f"{stage}: {time.perf_counter() - start:.1f} s since the start")
    trained = time.perf_counter()

    from hd.eval.evaluator import evaluate_inception

    entries = evaluate_inception(configs["eval"], dirs["eval"])
    assert {(e["model"], e["steps"]) for e in entries} >= {("teacher", 2), ("sketch", 1), ("refine", 1)}
    for e in entries:
        assert np.isfinite(e["fd"]) and e["fd"] > 0, e
        assert np.isfinite(e["inception_score"]) and e["inception_score"] >= 1.0, e
    print(f"latent pipeline: prepare {prepared - start:.1f} s, train {trained - prepared:.1f} s, "
          f"eval {time.perf_counter() - trained:.1f} s")
