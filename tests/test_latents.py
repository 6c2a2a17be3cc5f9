"""ADM centre crop, latent dataset preparation (hd.data.prepare_latents) and posterior sampling (hd.data.latents)."""

from __future__ import annotations

import io
import tarfile

import chex
import ml_collections
import numpy as np
import pytest
from PIL import Image

from hd.config import base_config
from hd.data import BatchIterator, make_batch_iterator
from hd.data.latents import LatentPosteriorSource
from hd.data.prepare_latents import FidAccumulator, ImagenetArchives, labels_sha256, prepare
from hd.data.preprocess import center_crop, to_model_range
from hd.eval.frechet import feature_statistics
from test_latent_pipeline import make_tinted_folder, make_tiny_vae


# --- ADM centre crop ------------------------------------------------------------------------------------

def test_center_crop_box_halves_large_images():
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    out = center_crop(Image.fromarray(pixels), 256)  # 512 >= 2 * 256: one 2x2 box step, then bicubic at scale 1
    block_means = pixels.astype(np.float64).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    # The mean of each 2x2 block: PIL's BOX resize (ADM's call) rounds in fixed point, within one level.
    assert np.abs(out - block_means).max() <= 1.0
    assert np.abs(out.astype(np.float64) - np.asarray(
        Image.fromarray(pixels).resize((256, 256), Image.Resampling.BICUBIC))).mean() > 5  # not a plain bicubic


def test_center_crop_takes_the_centre_and_rounds_offsets_down():
    pixels = np.random.default_rng(1).integers(0, 256, (256, 301, 3), dtype=np.uint8)  # H=256, W=301
    out = center_crop(Image.fromarray(pixels), 256)  # short side already 256: no resize, left = (301-256)//2 = 22
    np.testing.assert_array_equal(out, pixels[:, 22:278])


def test_center_crop_bicubic_sizes_and_grayscale():
    # 1100x600 -> box once -> 550x300 (300 < 512 stops) -> bicubic to round(550 * 256/300) = 469 x 256 -> crop.
    gradient = np.tile(np.linspace(0, 255, 1100).astype(np.uint8), (600, 1))
    out = center_crop(Image.fromarray(gradient, mode="L"), 256)
    assert out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # grayscale becomes three equal channels
    # The crop starts at column (469 - 256) // 2 = 106 of the 469-wide image: gradient value ~ 106/468 * 255.
    assert abs(int(out[128, 0, 0]) - 106 / 468 * 255) <= 2
    np.testing.assert_allclose(to_model_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


# --- Posterior sampling --------------------------------------------------------------------------------

def _posterior_source(n: int = 12, *, std: float, flip: bool = True, scale: float = 0.5) -> LatentPosteriorSource:
    mean = np.zeros((n, 2, 2, 2, 1), np.float16)
    mean[:, 0], mean[:, 1] = np.arange(n)[:, None, None, None] * 10, np.arange(n)[:, None, None, None] * 10 + 1
    arrays = (mean, np.full_like(mean, std), np.arange(n, dtype=np.int32) % 3)
    return LatentPosteriorSource(num_classes=3, latent_shape=(2, 2, 1), scale=scale, flip=flip, arrays=arrays)


def test_latents_are_scaled_posterior_draws_of_either_flip():
    batches = [b for _, b in zip(range(40), BatchIterator(_posterior_source(std=0.0), global_batch_size=6, seed=3))]
    x = np.concatenate([b["x"] for b in batches]) / 0.5  # std 0: the latent is mean[flip] * scale
    chex.assert_shape(x, (240, 2, 2, 1))
    assert np.all(x == x[:, :1, :1])  # one value per example
    example, flipped = np.divmod(x[:, 0, 0, 0].astype(int), 10)
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), example % 3)
    assert set(flipped) == {0, 1} and 0.35 < flipped.mean() < 0.65  # the flip with probability 1/2

    no_flip = BatchIterator(_posterior_source(std=0.0, flip=False), global_batch_size=6, seed=3)
    assert all(np.all(next(no_flip)["x"] / 0.5 % 10 == 0) for _ in range(10))


def test_latent_noise_depends_on_seed_and_step_only():
    source = _posterior_source(n=8, std=2.0, scale=0.5)
    source.arrays[0][:] = 0  # mean 0: x = std * noise * scale
    it = BatchIterator(source, global_batch_size=8, seed=0)
    draws = np.concatenate([next(it)["x"] for _ in range(50)])  # 1600 values
    assert abs(draws.std() - 1.0) < 0.05 and abs(draws.mean()) < 0.1
    source.arrays[0][:] = _posterior_source(n=8, std=2.0).arrays[0]

    it = BatchIterator(source, global_batch_size=8, seed=0)
    first, second = next(it), next(it)  # batch 1 revisits the same 8 examples (one epoch = one batch)
    np.testing.assert_array_equal(np.sort(first["y"]), np.sort(second["y"]))
    assert not np.allclose(np.sort(first["x"].ravel()), np.sort(second["x"].ravel()))  # fresh noise per visit

    resumed = BatchIterator(source, global_batch_size=8, seed=0)
    resumed.set_state(it.get_state())
    chex.assert_trees_all_equal(next(resumed), next(it))
    # Two hosts' rows put together are the one-host batch (noise seeded by stream position, not by host).
    hosts = [BatchIterator(source, global_batch_size=8, seed=0, process_index=p, process_count=2) for p in range(2)]
    whole = BatchIterator(source, global_batch_size=8, seed=0)
    for _ in range(3):
        parts = [next(h) for h in hosts]
        chex.assert_trees_all_equal(whole.__next__(), {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def test_fid_accumulator_matches_feature_statistics():
    features = np.random.default_rng(0).standard_normal((50, 6)) * [1, 2, 3, 1, 1, 5] + 3
    a, b = FidAccumulator(dim=6), FidAccumulator(dim=6)
    a.add(features[:20]), b.add(features[20:])
    a.shards, b.shards = {0}, {1}
    a.merge(b)
    mu, sigma = a.statistics()
    want_mu, want_sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="counted twice"):
        a.merge(b)


# --- Preparation ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    labels = make_tinted_folder(root / "images", per_class=4)
    vae = make_tiny_vae(str(root / "vae"))
    summary = prepare(source=f"folder:{root / 'images'}", vae_dir=str(root / "vae"), out=str(root / "out"),
                      name="tiny_latents", resolution=32, batch=8, shard_size=16, workers=2)
    return root, labels, vae, summary


def _latent_config(root, **overrides) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name, c.data.tfds_name, c.data.data_dir = "tfds", "tiny_latents", str(root / "out")
    c.data.latent_posterior, c.data.latent_scale = True, 0.5
    for key, value in overrides.items():
        c.data[key] = value
    return c


def test_prepared_dataset_holds_the_vae_posteriors_of_both_flips(prepared):
    import tensorflow_datasets as tfds

    root, labels, vae, summary = prepared
    assert summary["num_examples"] == len(labels) == 40 and summary["labels_sha256"] == labels_sha256(labels)
    builder = tfds.builder_from_directory(str(root / "out" / "tiny_latents" / "1.0.0"))
    assert builder.info.metadata["scaling_factor"] == 0.5 and builder.info.splits["train"].num_shards == 3
    source = builder.as_data_source(split="train")
    examples = source.__getitems__([0, 13, 39])
    paths = [root / "images" / f"class_{k}" / f"{j:04d}.png" for k, j in ((0, 0), (3, 1), (9, 3))]
    pixels = np.stack([center_crop(Image.open(p), 32) for p in paths])
    x = to_model_range(pixels)
    for flip, images in enumerate((x, x[:, :, ::-1])):
        mean, std = map(np.asarray, vae.encode(images))
        for r, e in enumerate(examples):
            chex.assert_shape(e["mean"], (2, 8, 8, 4))
            assert e["mean"].dtype == np.float16
            np.testing.assert_allclose(e["mean"][flip], mean[r], rtol=2e-3, atol=1e-3)
            np.testing.assert_allclose(e["std"][flip], std[r], rtol=2e-3, atol=1e-5)
    assert [e["label"] for e in examples] == [0, 3, 9] and [e["index"] for e in examples] == [0, 13, 39]


def test_training_reads_latents_in_memory_and_through_the_data_source(prepared):
    root = prepared[0]
    batches = {}
    for mode, limit in (("memory", 1024), ("data_source", 0)):
        config = _latent_config(root, max_in_memory_mb=limit)
        data = make_batch_iterator(config.data, global_batch_size=16, seed=1)
        assert data.source.example_shape == (8, 8, 4) and data.source.num_examples == 40
        batches[mode] = [next(data) for _ in range(4)]
    chex.assert_trees_all_equal(batches["memory"], batches["data_source"])
    chex.assert_shape(batches["memory"][0]["x"], (16, 8, 8, 4))
    assert batches["memory"][0]["x"].dtype == np.float32


def test_latent_config_and_rerun_errors(prepared):
    root, _, _, summary = prepared
    with pytest.raises(ValueError, match="latent_scale=0.5"):
        make_batch_iterator(_latent_config(root, latent_scale=0.18215).data, global_batch_size=8, seed=0)
    # The same command again: already prepared, nothing rewritten.
    again = prepare(source=f"folder:{root / 'images'}", vae_dir=str(root / "vae"), out=str(root / "out"),
                    name="tiny_latents", resolution=32, batch=8, shard_size=16, workers=2)
    assert again["labels_sha256"] == summary["labels_sha256"]
    # Other settings into the same dataset: refused before anything is written.
    with pytest.raises(ValueError, match="shard_size"):
        prepare(source=f"folder:{root / 'images'}", vae_dir=str(root / "vae"), out=str(root / "out"),
                name="tiny_latents", resolution=32, batch=8, shard_size=8, workers=2)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 4"):
        prepare(source=f"folder:{root / 'images'}", vae_dir=str(root / "vae"), out=str(root / "other"),
                resolution=30)
    assert not (root / "other").exists()


def _jpeg(color: tuple[int, int, int], size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_imagenet_archives_read_nested_tars_with_tfds_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        ImagenetArchives(str(tmp_path), "train")
    # Two class archives in TFDS's order: n01440764 is label 0, n01443537 label 1 (TFDS labels.txt).
    images = {"n01443537": [(0, 0, 255)], "n01440764": [(255, 0, 0), (0, 255, 0)]}
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, colors in images.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i, color in reversed(list(enumerate(colors))):  # stored out of order: read back sorted
                    _add(t, f"{wnid}_{i}.JPEG", _jpeg(color))
            _add(outer, f"{wnid}.tar", inner.getvalue())
    source = ImagenetArchives(str(tmp_path), "train", str(tmp_path / "work" / "index.npz"))
    np.testing.assert_array_equal(source.labels, [0, 0, 1])
    colors = [np.asarray(source.load(i).convert("RGB"))[15, 20] for i in range(3)]
    np.testing.assert_allclose(colors, [(255, 0, 0), (0, 255, 0), (0, 0, 255)], atol=8)
    cached = ImagenetArchives(str(tmp_path), "train", str(tmp_path / "work" / "index.npz"))  # from the index
    np.testing.assert_array_equal(cached.offsets, source.offsets)


def test_bench_latents_measures_the_iterator_on_a_synthetic_dataset(tmp_path):
    from hd.tools.bench_latents import goal_batches_per_s, measure, write_synthetic

    write_synthetic(str(tmp_path), 300, latent_shape=(4, 4, 4), shard_size=128)
    result = measure(str(tmp_path), batch=32, batches=3)
    assert result["x_shape"] == [32, 4, 4, 4] and result["batches_per_s"] > 0
    # Timings are reported, not judged here (a shared machine makes any bound flaky): only that they were taken.
    assert 0 < result["read_seconds_per_batch"] < float("inf") and 0 < result["seconds_per_batch"] < float("inf")
    # 4.29e14 FLOP at 50 % of 16 x 275 TFLOP/s: 0.195 s per step, 5.13 steps/s; 4 hosts feed 64 examples each.
    goal = goal_batches_per_s(step_flops=4.29e14, chips=16, chip_flops=275e12, mfu=0.5, hosts=4,
                              global_batch=256, batch=256)
    np.testing.assert_allclose([goal["step_s"], goal["consumed_batches_per_s_per_host"]], [0.195, 1.2820513],
                               rtol=1e-6)
    np.testing.assert_allclose(goal["goal_batches_per_s_per_host"], 12.820513, rtol=1e-6)
