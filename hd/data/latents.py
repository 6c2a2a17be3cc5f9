"""Training examples from a VAE-posterior dataset written by hd.data.prepare_latents.

Each stored example holds the posterior mean and std of an image and of its horizontal flip (float16,
[2, h, w, c], unscaled). Every time the iterator hands an example out it draws
    flip ~ Bernoulli(1/2),  noise ~ N(0, I),  x = (mean[flip] + std[flip] * noise) * latent_scale,
from a generator seeded by (seed, position in the example stream), the position being global batch s's
row offset s * B + row. So a latent is a function of (seed, s) like the rest of batch s: resume stays exact and
does not depend on the number of hosts, and every visit of an image sees a new latent and a new flip.

Config (config.data): name='tfds', tfds_name, data_dir, split, latent_posterior=True, latent_scale (must equal
the scaling factor the dataset was prepared with), latent_flip (False: always the unflipped image),
max_in_memory_mb (splits that fit are read into memory once; bigger ones are read batch by batch through
`tfds.data_source`).
"""

from __future__ import annotations

import concurrent.futures
import os

import ml_collections
import numpy as np

from hd.data.sources import Batch, Source, TfdsSource, open_tfds

_STREAM_TAG = 0x1A7E47  # separates the latent draws' seeds from the epoch permutations' ([seed, epoch])
_READ_CHUNK = 2048


class LatentPosteriorSource(Source):
    """Finite source of posterior (mean, std) pairs; `draw` turns them into latents (see the module docstring).

    `get` is not offered: a latent needs its stream position, which only the iterator knows.
    """

    def __init__(self, *, num_classes: int, latent_shape: tuple[int, ...], scale: float, flip: bool,
                 tfds_source: TfdsSource | None = None,
                 arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        if (tfds_source is None) == (arrays is None):
            raise ValueError("give either a TFDS data source or in-memory (mean, std, labels) arrays")
        self.tfds_source, self.arrays = tfds_source, arrays
        self.num_examples = len(arrays[2]) if arrays is not None else tfds_source.num_examples
        self.num_classes, self.example_shape = num_classes, tuple(latent_shape)
        self.scale, self.flip = float(scale), bool(flip)
        self._threads = max(1, min(8, os.cpu_count() or 1))
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, std, labels) at `indices`: float16 [n, 2, *latent_shape] twice and int32 [n]."""
        if self.arrays is not None:
            mean, std, labels = self.arrays
            return mean[indices], std[indices], labels[indices]
        examples = self.tfds_source.data_source.__getitems__([int(i) for i in indices])
        return (np.stack([e["mean"] for e in examples]), np.stack([e["std"] for e in examples]),
                np.asarray([e["label"] for e in examples], np.int32))

    def draw(self, indices: np.ndarray, positions: np.ndarray, seed: int) -> Batch:
        """The latents of the examples at `indices` for stream `positions` (same length)."""
        mean, std, labels = self.read(indices)
        n = len(indices)
        x = np.empty((n, *self.example_shape), np.float32)

        def rows(lo: int, hi: int) -> None:
            for r in range(lo, hi):
                rng = np.random.default_rng([seed, int(positions[r]), _STREAM_TAG])
                f = int(rng.integers(2)) if self.flip else 0
                noise = rng.standard_normal(self.example_shape, dtype=np.float32)
                np.multiply(std[r, f], noise, out=x[r])
                x[r] += mean[r, f]
                x[r] *= self.scale

        # numpy draws and ufuncs release the GIL: row blocks run in parallel, each row seeded on its own, so
        # the result does not depend on the number of threads.
        bounds = np.linspace(0, n, min(self._threads, n) + 1).astype(int)
        list(self._pool().map(rows, bounds[:-1], bounds[1:]))
        return {"x": x, "y": labels}

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self._threads)
        return self._executor


def open_latent_source(cfg: ml_collections.ConfigDict) -> LatentPosteriorSource:
    """The latent source config.data names (fails fast, naming the fix, if the dataset is absent or other)."""
    if cfg.name != "tfds":
        raise ValueError(f"config.data.latent_posterior=True reads a dataset made by hd.data.prepare_latents: set "
                         f"config.data.name='tfds' (got {cfg.name!r}) and config.data.tfds_name")
    data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    # max_in_memory_mb=0: open_tfds only checks the dataset and hands back its data source.
    source = open_tfds(cfg.tfds_name, data_dir, cfg.split, image_key="mean", label_key=cfg.label_key,
                       num_classes=cfg.num_classes, max_in_memory_mb=0)
    if not isinstance(source, TfdsSource) or len(source.example_shape) != 4 or source.example_shape[0] != 2:
        raise ValueError(f"'{cfg.tfds_name}' feature 'mean' has shape {source.example_shape}, not [2, h, w, c]: it "
                         "was not written by hd.data.prepare_latents")
    metadata = source.data_source.dataset_info.metadata or {}
    stored = metadata.get("scaling_factor")
    if stored is not None and not np.isclose(stored, cfg.latent_scale, rtol=1e-6):
        raise ValueError(f"config.data.latent_scale={cfg.latent_scale} but '{cfg.tfds_name}' was encoded by a VAE "
                         f"with scaling_factor={stored}: set --config.data.latent_scale={stored}")
    latent_shape = source.example_shape[1:]
    common = dict(num_classes=source.num_classes, latent_shape=latent_shape, scale=cfg.latent_scale,
                  flip=cfg.latent_flip)
    itemsize = np.dtype(source.data_source.dataset_info.features["mean"].np_dtype).itemsize
    split_bytes = 2 * source.num_examples * int(np.prod(source.example_shape)) * itemsize  # mean and std
    if split_bytes > cfg.max_in_memory_mb * 2**20:
        return LatentPosteriorSource(tfds_source=source, **common)
    reader = LatentPosteriorSource(tfds_source=source, **common)
    chunks = [reader.read(np.arange(a, min(a + _READ_CHUNK, source.num_examples)))
              for a in range(0, source.num_examples, _READ_CHUNK)]
    arrays = tuple(np.concatenate([c[i] for c in chunks]) for i in range(3))
    return LatentPosteriorSource(arrays=arrays, **common)
