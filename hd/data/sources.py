"""Example sources: Fashion-MNIST, any prepared TFDS ArrayRecord dataset, and 2-D toy distributions.

A source hands out batches as {'x': float32, 'y': int32}. Image sources return NHWC images in
[-1, 1]. Finite sources are indexed (`get`); the toy sources are infinite and sampled (`sample`).

Config fields (ml_collections.ConfigDict):
  name: 'fashion_mnist' | 'tfds' | 'toy2d'
  data_dir: TFDS data dir; '' means ~/.cache/hd/tfds for fashion_mnist, and $TFDS_DATA_DIR or
    ~/tensorflow_datasets for tfds.
  tfds_name: 'name[/config][:version]' of an already prepared dataset (name='tfds').
  split: e.g. 'train', 'test', 'train[:90%]'.
  toy: '8gaussians' | 'checkerboard' | 'moons' (name='toy2d').
  num_classes: must match the dataset (checked).
Optional: image_key ('image'), label_key ('label'), idx_dir (Fashion-MNIST IDX files),
  max_in_memory_mb (1024): splits whose raw arrays fit are read into memory once; larger ones
  are read batch by batch through the TFDS data source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from hd.data import fashion_mnist

Batch = dict[str, np.ndarray]

DEFAULT_HD_DATA_DIR = "~/.cache/hd/tfds"
_READ_CHUNK = 4096  # Examples per data-source call when filling memory: bounds the temporary lists.


class Source:
    """A dataset of (x, y) examples. `num_examples` is None for infinite (sampled) sources."""

    num_examples: int | None
    num_classes: int
    example_shape: tuple[int, ...]

    def get(self, indices: np.ndarray) -> Batch:
        """Returns the examples at `indices`, in that order (finite sources)."""
        raise NotImplementedError(f"{type(self).__name__} is not indexable")

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        """Draws n examples (infinite sources)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sampled")


def _to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to [-1, 1]; float features (e.g. VAE latents, already scaled) pass through as float32."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) * (2.0 / 255.0) - 1.0
    return images.astype(np.float32)


def _supported_dtype(dtype: np.dtype) -> bool:
    return dtype == np.uint8 or np.issubdtype(dtype, np.floating)


class ArraySource(Source):
    """A finite dataset held in memory as NHWC uint8 images (or float features such as latents) and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        if not _supported_dtype(images.dtype) or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"want uint8 or float NHWC arrays and one label each, got {images.shape} "
                             f"{images.dtype}, {labels.shape}")
        # Kept as uint8 (4x smaller); conversion per batch is cheap next to a train step.
        self.images, self.labels = images, labels.astype(np.int32)
        self.num_examples, self.num_classes = len(images), num_classes
        self.example_shape = images.shape[1:]

    def get(self, indices: np.ndarray) -> Batch:
        return {"x": _to_float_images(self.images[indices]), "y": self.labels[indices]}


class TfdsSource(Source):
    """A finite dataset read batch by batch from a TFDS data source (for splits too big for memory)."""

    def __init__(self, data_source: Sequence[dict], image_key: str, label_key: str, num_classes: int,
                 example_shape: tuple[int, ...]):
        self.data_source, self.image_key, self.label_key = data_source, image_key, label_key
        self.num_examples, self.num_classes, self.example_shape = len(data_source), num_classes, example_shape

    def read_raw(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        examples = self.data_source.__getitems__([int(i) for i in indices])
        images = np.stack([np.asarray(e[self.image_key]) for e in examples])
        labels = np.asarray([e[self.label_key] for e in examples], dtype=np.int32)
        return images.reshape((len(examples), *self.example_shape)), labels

    def get(self, indices: np.ndarray) -> Batch:
        images, labels = self.read_raw(indices)
        return {"x": _to_float_images(images), "y": labels}


def _find_prepared(name: str, data_dir: str) -> epath.Path | None:
    """The version directory of a prepared `name[/config][:version]` in data_dir, or None.

    Looks only at the file system: constructing a registered builder and preparing it would
    download, and TFDS downloads retry for minutes when offline.
    """
    base, _, version = name.partition(":")
    root = epath.Path(data_dir) / base
    if version:
        candidates = [root / version]
    elif root.is_dir():
        versions = [p for p in root.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
        candidates = sorted(versions, key=lambda p: tuple(map(int, p.name.split("."))), reverse=True)
    else:
        candidates = []
    return next((p for p in candidates if (p / "dataset_info.json").exists()), None)


def open_tfds(name: str, data_dir: str, split: str, *, image_key: str = "image", label_key: str = "label",
              num_classes: int | None = None, max_in_memory_mb: float = 1024) -> Source:
    """Opens a prepared ArrayRecord TFDS split without ever downloading; fails fast if absent."""
    data_dir = os.path.expanduser(data_dir)
    builder_dir = _find_prepared(name, data_dir)
    if builder_dir is None:
        base = name.partition(":")[0]
        raise FileNotFoundError(
            f"TFDS dataset '{name}' is not prepared in data_dir={data_dir} (no {data_dir}/{base}/<version>/"
            f"dataset_info.json; datasets with configs need 'name/config'). Nothing is downloaded here. "
            f"Prepare it on a machine with network access: `tfds build {base} --data_dir=<dir> "
            f"--file_format=array_record` (or tfds.builder('{base}', data_dir=<dir>)"
            f".download_and_prepare(file_format='array_record')), then copy <dir>/{base} to {data_dir}/{base}."
        )
    builder = tfds.builder_from_directory(builder_dir)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"{builder_dir} is stored as {builder.info.file_format.value}; random access needs ArrayRecord: "
            f"rebuild with file_format='array_record'."
        )
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise KeyError(f"'{name}' has no feature '{key}' (features: {sorted(features.keys())})")
    dataset_classes = getattr(features[label_key], "num_classes", None)
    if num_classes is not None and dataset_classes is not None and num_classes != dataset_classes:
        raise ValueError(
            f"num_classes={num_classes} but '{name}' label '{label_key}' has {dataset_classes} classes"
        )
    num_classes = num_classes if num_classes is not None else dataset_classes
    image_feature = features[image_key]
    if not _supported_dtype(image_feature.np_dtype) or None in image_feature.shape:
        raise ValueError(f"'{name}' feature '{image_key}' must be uint8 (images) or float (e.g. latents) with a "
                         f"fixed shape, got {image_feature.np_dtype} {image_feature.shape}")
    example_shape = tuple(image_feature.shape)
    if len(example_shape) == 2:  # Grayscale without a channel axis.
        example_shape = (*example_shape, 1)

    source = TfdsSource(builder.as_data_source(split=split), image_key, label_key, num_classes, example_shape)
    split_bytes = source.num_examples * np.prod(example_shape) * np.dtype(image_feature.np_dtype).itemsize
    if split_bytes > max_in_memory_mb * 2**20:
        return source
    # Decoding examples costs ~30 ms per 256 on 2 cores, too slow next to a ~50 ms train step;
    # reading the split once (Fashion-MNIST train: ~5 s) makes every later batch a numpy gather.
    images = np.empty((source.num_examples, *example_shape), image_feature.np_dtype)
    labels = np.empty((source.num_examples,), np.int32)
    for start in range(0, source.num_examples, _READ_CHUNK):
        chunk = np.arange(start, min(start + _READ_CHUNK, source.num_examples))
        images[chunk], labels[chunk] = source.read_raw(chunk)
    return ArraySource(images, labels, num_classes)


class Toy2dSource(Source):
    """Infinite 2-D distributions for quick flow experiments.

    Labels: '8gaussians' -> which Gaussian (8 classes); 'checkerboard' -> which of the 8 filled
    squares of the 4x4 board (8 classes); 'moons' -> which moon (2 classes). With num_classes=1
    every label is 0 (unconditional).
    """

    RADIUS, STD = 2.0, 0.1  # 8gaussians: centres on a circle of radius 2, isotropic std 0.1.
    CLASSES = {"8gaussians": 8, "checkerboard": 8, "moons": 2}

    def __init__(self, toy: str, num_classes: int):
        if toy not in self.CLASSES:
            raise ValueError(f"unknown toy '{toy}'; choose from {sorted(self.CLASSES)}")
        if num_classes not in (1, self.CLASSES[toy]):
            raise ValueError(f"toy '{toy}' supports num_classes 1 or {self.CLASSES[toy]}, got {num_classes}")
        self.toy, self.num_classes = toy, num_classes
        self.num_examples, self.example_shape = None, (2,)

    @classmethod
    def gaussian_centres(cls) -> np.ndarray:
        angles = np.arange(8) * (2 * np.pi / 8)
        return cls.RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        if self.toy == "8gaussians":
            labels = rng.integers(0, 8, n)
            x = self.gaussian_centres()[labels] + self.STD * rng.standard_normal((n, 2))
        elif self.toy == "checkerboard":
            # Squares of side 1 on [-2, 2]^2; the filled ones are those with even column + row.
            labels = rng.integers(0, 8, n)
            col = labels % 4
            row = 2 * (labels // 4) + (col % 2)
            x = np.stack([col, row], axis=1) - 2.0 + rng.uniform(size=(n, 2))
        else:  # moons
            labels = rng.integers(0, 2, n)
            t = rng.uniform(0, np.pi, n)
            upper = np.stack([np.cos(t), np.sin(t)], axis=1)
            lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
            x = np.where(labels[:, None] == 0, upper, lower) - [0.5, 0.25]
            x = x + 0.05 * rng.standard_normal((n, 2))
        if self.num_classes == 1:
            labels = np.zeros_like(labels)
        return {"x": x.astype(np.float32), "y": labels.astype(np.int32)}


def load_source(cfg: ml_collections.ConfigDict) -> Source:
    """Builds the source a data config names (see the module docstring for the fields)."""
    if cfg.name == "toy2d":
        return Toy2dSource(cfg.toy, cfg.num_classes)
    if cfg.get("latent_posterior", False):  # VAE posteriors of hd.data.prepare_latents
        from hd.data.latents import open_latent_source  # imports this module

        return open_latent_source(cfg)
    max_mb = cfg.get("max_in_memory_mb", 1024)
    if cfg.name == "fashion_mnist":
        data_dir = os.path.expanduser(cfg.data_dir or DEFAULT_HD_DATA_DIR)
        fashion_mnist.prepare_fashion_mnist(data_dir, cfg.get("idx_dir", fashion_mnist.DEFAULT_IDX_DIR))
        return open_tfds(fashion_mnist.NAME, data_dir, cfg.split, num_classes=cfg.num_classes,
                         max_in_memory_mb=max_mb)
    if cfg.name == "tfds":
        data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        return open_tfds(cfg.tfds_name, data_dir, cfg.split, image_key=cfg.get("image_key", "image"),
                         label_key=cfg.get("label_key", "label"), num_classes=cfg.num_classes,
                         max_in_memory_mb=max_mb)
    raise ValueError(f"unknown data.name '{cfg.name}'; choose from 'fashion_mnist', 'tfds', 'toy2d'")
