"""Fashion-MNIST as a TFDS ArrayRecord dataset, built offline from the Debian IDX files.

The Debian package `dataset-fashion-mnist` ships the original gzipped IDX files, so no
download is needed. Features are plain `Tensor`s: `Image` features need TensorFlow to decode,
`Tensor` and `ClassLabel` are read with numpy alone through `tfds.data_source`.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
NAME = "hd_fashion_mnist"
_SPLITS = {"train": "train", "test": "t10k"}  # split -> IDX file prefix
_INSTALL_HINT = (
    "install with `apt-get update && apt-get install -y dataset-fashion-mnist` "
    "(or pass the directory holding the IDX files as idx_dir)"
)


def _idx_paths(idx_dir: str, prefix: str) -> tuple[str, str]:
    return (
        os.path.join(idx_dir, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(idx_dir, f"{prefix}-labels-idx1-ubyte.gz"),
    )


def check_idx_files(idx_dir: str) -> None:
    """Raises FileNotFoundError (with the install hint) unless all four IDX files exist."""
    missing = [
        p for prefix in _SPLITS.values() for p in _idx_paths(idx_dir, prefix) if not os.path.isfile(p)
    ]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST IDX files missing: {missing}; {_INSTALL_HINT}.")


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


class HdFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al. 2017, MIT licence) from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from the Debian dataset-fashion-mnist IDX files."}
    # TFDS 4.9.10 derives this via `importlib_resources`, which it only depends on for
    # Python < 3.9, so the default fails with ModuleNotFoundError on 3.11. Same value, no import.
    code_path = epath.Path(__file__)

    def __init__(self, *, idx_dir: str = DEFAULT_IDX_DIR, **kwargs):
        self._idx_dir = idx_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST: 28x28 grayscale images of 10 clothing classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep IDX order so example i of a split is row i of its IDX file.
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        check_idx_files(self._idx_dir)
        return {split: self._generate_examples(prefix) for split, prefix in _SPLITS.items()}

    def _generate_examples(self, prefix: str):
        image_path, label_path = _idx_paths(self._idx_dir, prefix)
        images, labels = read_idx(image_path), read_idx(label_path)
        if len(images) != len(labels):
            raise ValueError(f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels")
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


def prepare_fashion_mnist(data_dir: str, idx_dir: str = DEFAULT_IDX_DIR) -> None:
    """Builds `hd_fashion_mnist` into data_dir unless it is already there (then a quick no-op)."""
    builder = HdFashionMnist(data_dir=os.path.expanduser(data_dir), idx_dir=idx_dir, file_format="array_record")
    if builder.is_prepared():
        return
    check_idx_files(idx_dir)  # Fail before TFDS creates any directories.
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
