"""Fashion-MNIST as a TFDS ArrayRecord dataset, built offline from the Debian IDX files.

The Debian package `dataset-fashion-mnist` ships the original gzipped IDX files, so no
download is needed. Features are plain `Tensor`s: `Image` features need TensorFlow to decode,
`Tensor` and `ClassLabel` are read with numpy alone through `tfds.data_source`.

The prepared dataset is a cache of the IDX files in `idx_dir`: it records their sizes and sha256
(`hd_source.json` in the dataset's version directory), and every later use checks that `idx_dir`
still holds those files, so a changed or missing `idx_dir` is an error instead of silently reading
data built from other files. `idx_dir=''` uses a prepared cache as it is (e.g. one copied to a
machine without the IDX files).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import zlib

import numpy as np
from absl import logging
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


SOURCE_RECORD = "hd_source.json"  # in the prepared version directory: the IDX files it was built from
_CORRUPT_HINT = (
    "reinstall the IDX files (`apt-get install --reinstall dataset-fashion-mnist`) or point config.data.idx_dir at a "
    "directory with intact IDX files"
)


def check_idx_files(idx_dir: str) -> None:
    """Raises FileNotFoundError (with the install hint) unless all four IDX files exist."""
    if not os.path.isdir(idx_dir):
        raise FileNotFoundError(
            f"Fashion-MNIST idx_dir {idx_dir} (config.data.idx_dir) does not exist; {_INSTALL_HINT}.")
    missing = [
        p for prefix in _SPLITS.values() for p in _idx_paths(idx_dir, prefix) if not os.path.isfile(p)
    ]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST IDX files missing: {missing}; {_INSTALL_HINT}.")


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a cut-off or damaged gzip stream
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                         f"{_CORRUPT_HINT}") from e
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header; {_CORRUPT_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}); {_CORRUPT_HINT}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {array.size} bytes: the file is truncated or "
                         f"corrupt; {_CORRUPT_HINT}")
    return array.reshape(shape)


def _idx_count(path: str) -> int:
    """The first dimension in an IDX header (reads only the header)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return struct.unpack(">I", f.read(8)[4:8])[0]


def source_files(idx_dir: str) -> dict[str, dict]:
    """{file name: {'bytes', 'sha256'}} of the four IDX files: what a prepared cache was built from (content,
    not paths or times, so a copy of the same files elsewhere matches). About 0.1 s for Fashion-MNIST."""
    check_idx_files(idx_dir)
    files = {}
    for prefix in _SPLITS.values():
        for path in _idx_paths(idx_dir, prefix):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            files[os.path.basename(path)] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    return files


def _write_record(version_dir: str, idx_dir: str, files: dict) -> None:
    path = os.path.join(version_dir, SOURCE_RECORD)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"idx_dir": os.path.realpath(idx_dir), "files": files}, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:  # a read-only shared cache still works; it is checked again next time
        logging.warning("could not record the source of %s (%s)", version_dir, e)


def _check_cache_source(builder: "HdFashionMnist", idx_dir: str) -> None:
    """A prepared cache must have been built from the files now in idx_dir (see the module docstring)."""
    version_dir = str(builder.data_dir)
    try:
        files = source_files(idx_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (To use the prepared cache {version_dir} without checking it against IDX "
                                "files, set config.data.idx_dir=''.)") from None
    record_path = os.path.join(version_dir, SOURCE_RECORD)
    if not os.path.exists(record_path):
        # Prepared before caches recorded their source: accept it if the split sizes match the IDX headers.
        for split, prefix in _SPLITS.items():
            image_path = _idx_paths(idx_dir, prefix)[0]
            cached, idx = builder.info.splits[split].num_examples, _idx_count(image_path)
            if cached != idx:
                raise ValueError(f"the Fashion-MNIST cache {version_dir} has {cached} {split} examples but "
                                 f"{image_path} has {idx}: it was built from other files. Use another "
                                 "config.data.data_dir for these files, or delete the cache to rebuild it.")
        logging.info("recording %s as the source of the Fashion-MNIST cache %s", idx_dir, version_dir)
        _write_record(version_dir, idx_dir, files)
        return
    with open(record_path) as f:
        recorded = json.load(f)
    if recorded["files"] != files:
        changed = sorted(name for name in files if files[name] != recorded["files"].get(name))
        raise ValueError(
            f"the Fashion-MNIST cache {version_dir} was built from the IDX files in {recorded['idx_dir']}, but "
            f"config.data.idx_dir={idx_dir} holds different {changed} (size or sha256). If these files are "
            f"truncated or corrupt, {_CORRUPT_HINT}; if they are meant to be another dataset, use another "
            "config.data.data_dir for it (or delete the cache to rebuild it from them).")


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
    """Builds `hd_fashion_mnist` into data_dir unless it is already there, built from the same IDX files
    (then a quick check). idx_dir='' takes a prepared cache as it is."""
    data_dir = os.path.expanduser(data_dir)
    builder = HdFashionMnist(data_dir=data_dir, idx_dir=idx_dir, file_format="array_record")
    if not idx_dir:
        if not builder.is_prepared():
            raise FileNotFoundError(f"config.data.idx_dir='' uses a prepared Fashion-MNIST cache as it is, but "
                                    f"{builder.data_dir} holds none: set idx_dir to the IDX files' directory")
        return
    if builder.is_prepared():
        _check_cache_source(builder, idx_dir)
        return
    files = source_files(idx_dir)  # Fail before TFDS creates any directories.
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    _write_record(str(builder.data_dir), idx_dir, files)
