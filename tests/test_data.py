"""Tests for hd.data: Fashion-MNIST builder, sources and the deterministic per-host pipeline."""

import gzip
import json
import os
import struct
import time

import ml_collections
import numpy as np
import pytest

from hd.data import ArraySource, BatchIterator, Toy2dSource, load_source, make_batch_iterator, prepare_fashion_mnist
from hd.data import fashion_mnist

REAL_IDX_DIR = fashion_mnist.DEFAULT_IDX_DIR
FAKE_SIZES = {"train": 120, "t10k": 40}


def _data_cfg(**kw) -> ml_collections.ConfigDict:
    cfg = dict(name="fashion_mnist", data_dir="", tfds_name="", split="train", toy="8gaussians", num_classes=10)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _write_idx(path, array: np.ndarray) -> None:
    # IDX header: two zero bytes, 0x08 (unsigned byte), number of dims, then big-endian uint32 dims.
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_images(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(prefix))
    n = FAKE_SIZES[prefix]
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # Both ends of the range appear.
    return images, np.arange(n, dtype=np.uint8) % 10


@pytest.fixture(scope="session")
def fake_idx_dir(tmp_path_factory) -> str:
    idx_dir = tmp_path_factory.mktemp("idx")
    for prefix in FAKE_SIZES:
        images, labels = _fake_images(prefix)
        _write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(idx_dir)


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory, fake_idx_dir) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_fashion_mnist(data_dir, fake_idx_dir)
    return data_dir


def _small_source(n: int = 10) -> ArraySource:
    # Pixel value and label both equal the example index, so batches are easy to trace.
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)).copy()
    return ArraySource(images, np.arange(n), num_classes=n)


def _take(it: BatchIterator, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def _assert_same(batches_a, batches_b) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


# --- pipeline -------------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    a = _take(BatchIterator(_small_source(), global_batch_size=4, seed=0), 6)
    b = _take(BatchIterator(_small_source(), global_batch_size=4, seed=0), 6)
    c = _take(BatchIterator(_small_source(), global_batch_size=4, seed=1), 6)
    _assert_same(a, b)
    assert any(not np.array_equal(x["y"], z["y"]) for x, z in zip(a, c))
    assert a[0]["x"].dtype == np.float32 and a[0]["y"].dtype == np.int32


def test_each_epoch_visits_every_example_once():
    # 10 examples, batch 5: batches 0-1 are epoch 0, 2-3 epoch 1, each a permutation.
    batches = _take(BatchIterator(_small_source(), global_batch_size=5, seed=3), 4)
    for epoch in range(2):
        ys = np.concatenate([b["y"] for b in batches[2 * epoch : 2 * epoch + 2]])
        np.testing.assert_array_equal(np.sort(ys), np.arange(10))
    assert not np.array_equal(batches[0]["y"], batches[2]["y"])  # Reshuffled per epoch.


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_continues_exactly_across_epoch_boundary(k):
    # 10 examples, batch 4: batch 2 straddles epochs 0 and 1, batch 4 epochs 1 and 2.
    full = _take(BatchIterator(_small_source(), global_batch_size=4, seed=7), 8)
    first = BatchIterator(_small_source(), global_batch_size=4, seed=7)
    _take(first, k)
    state = json.loads(json.dumps(first.get_state()))
    resumed = BatchIterator(_small_source(), global_batch_size=4, seed=7)
    resumed.set_state(state)
    _assert_same(_take(resumed, 8 - k), full[k:])


def test_set_state_rejects_mismatched_iterator():
    state = BatchIterator(_small_source(), global_batch_size=4, seed=7).get_state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(_small_source(), global_batch_size=4, seed=8).set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("toy", [False, True])
def test_host_shards_partition_the_global_batch(process_count, toy):
    make = (lambda: Toy2dSource("8gaussians", 8)) if toy else (lambda: _small_source(37))
    global_batches = _take(BatchIterator(make(), global_batch_size=8, seed=5), 6)
    shards = [
        _take(BatchIterator(make(), global_batch_size=8, seed=5, process_index=p, process_count=process_count), 6)
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        parts = [shards[p][step] for p in range(process_count)]
        assert all(len(part["y"]) == 8 // process_count for part in parts)
        for key in ("x", "y"):
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), global_batch[key])
        if not toy and step < 4:  # Within one epoch the rows are distinct examples.
            ids = [set(part["y"].tolist()) for part in parts]
            assert sum(map(len, ids)) == len(set().union(*ids)) == 8


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
        BatchIterator(_small_source(), global_batch_size=10, seed=0, process_index=0, process_count=4)


# --- toy sources ----------------------------------------------------------------------------


@pytest.mark.parametrize("toy,num_classes", [("8gaussians", 8), ("checkerboard", 8), ("moons", 2), ("checkerboard", 1)])
def test_toy2d_shapes_and_labels(toy, num_classes):
    it = make_batch_iterator(_data_cfg(name="toy2d", toy=toy, num_classes=num_classes), global_batch_size=512, seed=0)
    batch = next(it)
    assert batch["x"].shape == (512, 2) and batch["x"].dtype == np.float32
    assert batch["y"].shape == (512,) and batch["y"].dtype == np.int32
    assert batch["y"].min() >= 0 and batch["y"].max() < num_classes
    if num_classes > 1:
        assert len(np.unique(batch["y"])) == num_classes
    if toy == "checkerboard":
        cells = np.floor(batch["x"]).astype(int)
        assert np.all(np.abs(batch["x"]) <= 2) and np.all(cells.sum(axis=1) % 2 == 0)


def test_8gaussians_points_near_their_centre():
    batch = Toy2dSource("8gaussians", 8).sample(np.random.default_rng(0), 1000)
    centres = Toy2dSource.gaussian_centres()
    distances = np.linalg.norm(batch["x"] - centres[batch["y"]], axis=1)
    assert distances.max() < 0.6 and 0.08 < distances.mean() < 0.18  # std 0.1 per axis.


def test_toy2d_rejects_unknown_names_and_class_counts():
    with pytest.raises(ValueError, match="spiral"):
        Toy2dSource("spiral", 1)
    with pytest.raises(ValueError, match="num_classes"):
        Toy2dSource("moons", 3)


# --- Fashion-MNIST and TFDS -----------------------------------------------------------------


def test_fake_fashion_mnist_counts_shapes_values(fake_data_dir, fake_idx_dir):
    for split, prefix in (("train", "train"), ("test", "t10k")):
        source = load_source(_data_cfg(data_dir=fake_data_dir, idx_dir=fake_idx_dir, split=split))
        assert isinstance(source, ArraySource)
        assert source.num_examples == FAKE_SIZES[prefix] and source.num_classes == 10
        batch = source.get(np.arange(source.num_examples))
        assert batch["x"].shape == (FAKE_SIZES[prefix], 28, 28, 1) and batch["x"].dtype == np.float32
        assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0
        images, labels = _fake_images(prefix)  # Built without shuffling: example i is IDX row i.
        np.testing.assert_allclose(batch["x"][..., 0], images / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(batch["y"], labels)


def test_per_batch_reading_matches_in_memory(fake_data_dir, fake_idx_dir):
    in_memory = load_source(_data_cfg(data_dir=fake_data_dir, idx_dir=fake_idx_dir))
    streamed = load_source(_data_cfg(data_dir=fake_data_dir, idx_dir=fake_idx_dir, max_in_memory_mb=0))
    assert not isinstance(streamed, ArraySource)
    indices = np.array([5, 0, 119, 5, 42])
    for key in ("x", "y"):
        np.testing.assert_array_equal(streamed.get(indices)[key], in_memory.get(indices)[key])


def test_second_prepare_is_a_noop(fake_data_dir, fake_idx_dir):
    info = os.path.join(fake_data_dir, fashion_mnist.NAME, "1.0.0", "dataset_info.json")
    mtime = os.path.getmtime(info)
    start = time.monotonic()
    prepare_fashion_mnist(fake_data_dir, fake_idx_dir)
    assert time.monotonic() - start < 2.0
    assert os.path.getmtime(info) == mtime


def test_generic_tfds_reads_a_prepared_dataset(fake_data_dir):
    cfg = _data_cfg(name="tfds", tfds_name=f"{fashion_mnist.NAME}:1.0.0", data_dir=fake_data_dir, split="test")
    source = load_source(cfg)
    assert source.num_examples == FAKE_SIZES["t10k"] and source.example_shape == (28, 28, 1)
    with pytest.raises(ValueError, match="num_classes=7"):
        load_source(_data_cfg(name="tfds", tfds_name=fashion_mnist.NAME, data_dir=fake_data_dir, num_classes=7))


def test_missing_idx_files_raise_with_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_fashion_mnist(str(tmp_path / "tfds"), str(tmp_path / "no_idx"))
    assert not (tmp_path / "tfds").exists()


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        load_source(_data_cfg(name="tfds", tfds_name="mnist", data_dir=str(tmp_path), num_classes=10))
    assert time.monotonic() - start < 10.0
    message = str(error.value)
    assert "'mnist'" in message and str(tmp_path) in message and "tfds build mnist" in message


@pytest.mark.skipif(
    not os.path.exists(os.path.join(REAL_IDX_DIR, "train-images-idx3-ubyte.gz")),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_real_fashion_mnist(tmp_path):
    data_dir = str(tmp_path)
    start = time.monotonic()
    prepare_fashion_mnist(data_dir)
    build_seconds = time.monotonic() - start
    test_split = load_source(_data_cfg(data_dir=data_dir, split="test"))
    assert test_split.num_examples == 10000
    batch = test_split.get(np.arange(10000))
    assert batch["x"].shape == (10000, 28, 28, 1) and -1.0 <= batch["x"].min() < batch["x"].max() <= 1.0
    np.testing.assert_array_equal(np.bincount(batch["y"]), np.full(10, 1000))
    # The train split is checked through the per-batch path, which skips the ~5 s full read.
    train = load_source(_data_cfg(data_dir=data_dir, max_in_memory_mb=0))
    assert train.num_examples == 60000
    assert next(BatchIterator(train, global_batch_size=256, seed=0))["x"].shape == (256, 28, 28, 1)
    print(f"Fashion-MNIST build: {build_seconds:.1f} s")


def test_float_features_pass_through_and_uint8_maps_to_unit_range():
    latents = np.random.default_rng(0).standard_normal((4, 2, 2, 4)).astype(np.float16)
    source = ArraySource(latents, np.arange(4), num_classes=4)
    batch = source.get(np.array([2, 0]))
    assert batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["x"], latents[[2, 0]].astype(np.float32))
    pixels = ArraySource(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1), np.arange(2), num_classes=2)
    np.testing.assert_allclose(pixels.get(np.arange(2))["x"].ravel(), [-1.0, 1.0])
    with pytest.raises(ValueError, match="uint8 or float"):
        ArraySource(np.zeros((2, 1, 1, 1), np.int32), np.arange(2), num_classes=2)
