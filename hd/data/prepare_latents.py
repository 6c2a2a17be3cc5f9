"""Encode an image data set into VAE posteriors once, as a TFDS ArrayRecord dataset the trainer reads.

    python -m hd.data.prepare_latents --source=tfds:imagenet2012 --vae=DIR --out=DATA_DIR --resolution=256 \
        [--split=train] [--name=imagenet256_latents] [--batch=256] [--shard_size=10000] \
        [--inception_weights=FILE --inception_sha256=HASH --fid_ref_out=FILE.npz]
    python -m hd.data.prepare_latents --source=folder:/path/to/images --vae=DIR --out=DATA_DIR --resolution=256

Sources:
- `tfds:imagenet2012`: the archives TFDS's imagenet2012 builder reads from its manual_dir
  (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar; --manual_dir, default $TFDS_DATA_DIR/downloads/manual or
  ~/tensorflow_datasets/downloads/manual), read directly with TFDS's class order (its labels.txt, the sorted
  WordNet ids) and validation labels, so label i means what it means in TFDS. The JPEG dataset is never built
  (no TensorFlow, no 150 GB copy) and nothing is ever downloaded: missing archives stop the command at once.
- `folder:/path`: one sub-folder per class (sorted folder names are labels 0..K-1), images (jpg/jpeg/png/
  webp/bmp, any case) sorted by file name inside each.

Each image gets the ADM centre crop (hd.data.preprocess), then the VAE encodes it and its horizontal flip in
one jitted call, the batch split over this process's devices (NamedSharding over a 'data' mesh axis). Examples:
  mean, std: float16 [2, H/f, W/f, C]  (axis 0: the image, its horizontal flip; UNscaled posterior)
  label: ClassLabel;  index: int64, the example's position in the source order.
float16 because the stored values are read every step at ImageNet scale: half the disk and read bandwidth of
float32 (42 GB instead of 84 GB for ImageNet train), and its rounding (relative 2^-11 of each value) is 8x finer
than the bfloat16 (2^-8) the XL configs compute in. Values beyond float16's range stop the command.

Both flips are stored with each example, and the trainer draws one of them with probability 1/2 at every visit
(hd.data.latents): an epoch is still one pass over the images, as ADM/DiT's random-flip augmentation, and the
latent itself is drawn fresh from the posterior, (mean + std * noise) * scaling_factor.

Resumable: examples are written in fixed shards of --shard_size (process p of P writes shards p, p+P, ...).
Each shard goes to a temporary file, is read back (count, labels, indices), renamed to its final TFDS name and
only then recorded in `_prepare/<split>/shard-NNNNN.json`; a rerun of the same command skips recorded shards and
redoes any other, so a killed run ends with exactly the uninterrupted result. At the end process 0 checks the
count and a sha256 of all labels against the source and writes the TFDS metadata (dataset_info.json last: the
trainer sees the dataset only once it is whole). With --inception_weights it also writes ADM-style FID reference
statistics (`mu`, `sigma` of Inception pool features) of the centre-cropped images (unflipped).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import signal
import tarfile
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from hd import parallel
from hd.data.preprocess import center_crop
from hd.eval.inception import file_sha256, inception_features, load_inception_params
from hd.models.vae import CONFIG_NAME, WEIGHTS_NAME, load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STORAGE_DTYPE = np.float16
METADATA_VERSION = "1.0.0"
# Test hook: SIGKILL this process while it writes the shard after this many shards were committed in this run.
KILL_ENV = "HD_PREPARE_KILL_AFTER_SHARDS"

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 [B, H, W, 3] -> (mean, std) [B, 2, ...]


# --- Image sources ------------------------------------------------------------------------------------------

class ImageSource(Protocol):
    """Images in a fixed order with their labels (known without decoding any image)."""

    spec: str  # how the source was named on the command line (recorded in the manifest)
    class_names: list[str]
    labels: np.ndarray  # int64 [N]

    def load(self, index: int) -> Image.Image: ...


def labels_sha256(labels: np.ndarray) -> str:
    """The hash a preparation is checked with: sha256 of the labels as little-endian int64, in index order."""
    return hashlib.sha256(np.asarray(labels, "<i8").tobytes()).hexdigest()


class FolderImages:
    """A folder with one sub-folder per class."""

    def __init__(self, root: str):
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--source=folder:{root}: no such directory (want one sub-folder per class)")
        self.spec = f"folder:{root}"
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"--source=folder:{root} has no sub-folders: put each class's images in its own folder")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"class folder {os.path.join(root, name)} has no images ({IMAGE_EXTENSIONS})")
            paths += [os.path.join(root, name, f) for f in files]
            labels += [label] * len(files)
        self.paths, self.labels = paths, np.asarray(labels, np.int64)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            image.load()
            return image


def default_manual_dir() -> str:
    data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.join(os.path.expanduser(data_dir), "downloads", "manual")


def _tfds_imagenet_file(name: str) -> str:
    return os.fspath(tfds.core.tfds_path("datasets/imagenet2012") / name)


class ImagenetArchives:
    """ImageNet-1k from the ILSVRC2012 tar archives in TFDS's manual_dir, with TFDS's label numbering.

    The member offsets of the (nested) train archive are scanned once (headers only) and cached in `index_path`;
    every image is then one positioned read, so any process can read any example.
    """

    ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}

    def __init__(self, manual_dir: str, split: str, index_path: str | None = None):
        if split not in self.ARCHIVES:
            raise ValueError(f"--split={split!r}: tfds:imagenet2012 has splits {sorted(self.ARCHIVES)}")
        manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
        self.path = os.path.join(manual_dir, self.ARCHIVES[split])
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"tfds:imagenet2012 split {split!r} needs {self.path}, which does not exist. Nothing is downloaded "
                f"here: get {self.ARCHIVES[split]} from https://image-net.org (after accepting its terms) and put it "
                f"in TFDS's manual_dir ({manual_dir}), or pass --manual_dir=DIR where it is.")
        self.spec = f"tfds:imagenet2012:{split}"
        with open(_tfds_imagenet_file("labels.txt")) as f:
            self.class_names = f.read().split()
        if index_path and os.path.exists(index_path):
            index = np.load(index_path)
            offsets, sizes, labels = index["offsets"], index["sizes"], index["labels"]
        else:
            offsets, sizes, labels = self._scan(split)
            if index_path:
                os.makedirs(os.path.dirname(index_path), exist_ok=True)
                _atomic_write(index_path, lambda f: np.savez(f, offsets=offsets, sizes=sizes, labels=labels))
        self.offsets, self.sizes, self.labels = offsets, sizes, labels
        self._fd = os.open(self.path, os.O_RDONLY)  # os.pread: thread-safe positioned reads

    def _scan(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        entries = []  # (sort key, offset, size, label)
        label_of = {name: i for i, name in enumerate(self.class_names)}
        with open(self.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
            members = [m for m in outer.getmembers() if m.isfile()]
            if split == "validation":
                with open(_tfds_imagenet_file("validation_labels.txt")) as lf:
                    val_labels = lf.read().split()  # the labels of the sorted file names
                members.sort(key=lambda m: os.path.basename(m.name))
                if len(members) != len(val_labels):
                    raise ValueError(f"{self.path} holds {len(members)} files, TFDS lists {len(val_labels)} labels")
                for m, wnid in zip(members, val_labels):
                    entries.append((m.name, m.offset_data, m.size, label_of[wnid]))
            else:
                for m in members:  # one inner tar per class: n01440764.tar
                    wnid = os.path.basename(m.name)[:-4]
                    if wnid not in label_of:
                        raise ValueError(f"{self.path}: member {m.name} is not a class archive of TFDS's labels.txt")
                    f.seek(m.offset_data)
                    with tarfile.open(fileobj=f, mode="r:") as inner:  # offsets are absolute in f
                        for im in inner.getmembers():
                            if im.isfile():
                                entries.append((f"{wnid}/{os.path.basename(im.name)}", im.offset_data, im.size,
                                                label_of[wnid]))
        entries.sort()
        return (np.asarray([e[1] for e in entries], np.int64), np.asarray([e[2] for e in entries], np.int64),
                np.asarray([e[3] for e in entries], np.int64))

    def load(self, index: int) -> Image.Image:
        data = os.pread(self._fd, int(self.sizes[index]), int(self.offsets[index]))
        with Image.open(io.BytesIO(data)) as image:  # PIL reads the few CMYK / PNG-in-JPEG files as they are
            image.load()
            return image


def open_image_source(spec: str, split: str, manual_dir: str, work_dir: str) -> ImageSource:
    kind, _, arg = spec.partition(":")
    if kind == "folder" and arg:
        return FolderImages(arg)
    if kind == "tfds" and arg == "imagenet2012":
        return ImagenetArchives(manual_dir, split, os.path.join(work_dir, "imagenet_index.npz"))
    raise ValueError(f"--source={spec!r}: use tfds:imagenet2012 or folder:/path/with/one/folder/per/class")


# --- Encoding -----------------------------------------------------------------------------------------------

def make_encoder(vae: Any, batch: int, devices: Sequence[Any] | None = None) -> Encoder:
    """uint8 images [B <= batch, H, W, 3] -> (mean, std) float16 [B, 2, h, w, c] of each image and its
    horizontal flip.

    One jitted call per batch, the batch split over `devices` (default: this process's); each device encodes
    its own images and their flips, so nothing crosses devices. Every call has the same padded shape, so the
    encoder compiles once.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(vae.params, replicated)

    def encode(params, pixels):
        x = pixels.astype(jnp.float32) / 127.5 - 1.0  # hd.data.preprocess.to_model_range, on the device
        both = jnp.stack([x, x[:, :, ::-1]], axis=1)  # [B, 2, H, W, 3]: image i and its flip stay together
        mean, std = vae.encode_fn(params, both.reshape(-1, *x.shape[1:]))
        unflat = lambda a: a.reshape(x.shape[0], 2, *a.shape[1:]).astype(STORAGE_DTYPE)
        return unflat(mean), unflat(std)

    padded = -(-batch // len(devices)) * len(devices)  # a multiple of the device count
    jitted = jax.jit(encode, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(pixels)
        if n > padded:
            raise ValueError(f"{n} images in one encoder call, more than the batch of {batch}")
        pad = padded - n  # a short last batch: repeat its last image
        if pad:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        mean, std = jax.device_get(jitted(params, pixels))
        return np.asarray(mean[:n]), np.asarray(std[:n])

    return run


class FidAccumulator:
    """Sums of Inception pool features and of their outer products (float64) over the shards added so far."""

    def __init__(self, dim: int = 2048):
        self.count, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))
        self.shards: set[int] = set()

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        self.count += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: FidAccumulator) -> None:
        if self.shards & other.shards:
            raise ValueError(f"FID statistics of shards {sorted(self.shards & other.shards)} were counted twice")
        self.count, self.total = self.count + other.count, self.total + other.total
        self.outer = self.outer + other.outer
        self.shards |= other.shards

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, as hd.eval.frechet.feature_statistics computes them from all features."""
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma

    def save(self, path: str) -> None:
        _atomic_write(path, lambda f: np.savez(f, count=self.count, total=self.total, outer=self.outer,
                                               shards=np.asarray(sorted(self.shards), np.int64)))

    @classmethod
    def load(cls, path: str) -> FidAccumulator:
        acc = cls()
        if os.path.exists(path):
            with np.load(path) as z:
                acc.count, acc.total, acc.outer = int(z["count"]), z["total"], z["outer"]
                acc.shards = set(int(s) for s in z["shards"])
        return acc


# --- Writing ------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, value: Any) -> None:
    _atomic_write(path, lambda f: json.dump(value, f, indent=1, sort_keys=True), mode="w")


def features_dict(latent_shape: tuple[int, ...], class_names: list[str]):
    # Tensor features stored as raw bytes: 10x faster to serialize than TFDS's default proto lists, and
    # exactly the array's size on disk.
    tensor = lambda: tfds.features.Tensor(shape=(2, *latent_shape), dtype=STORAGE_DTYPE, encoding="bytes")
    return tfds.features.FeaturesDict({
        "mean": tensor(), "std": tensor(), "label": tfds.features.ClassLabel(names=class_names),
        "index": tfds.features.Scalar(dtype=np.int64)})


def _template(version_dir: str, name: str, split: str | None):
    return tfds.core.ShardedFileTemplate(data_dir=version_dir, dataset_name=name, split=split,
                                         filetype_suffix="array_record")


@dataclasses.dataclass
class Plan:
    """Everything that fixes the result of a preparation; a rerun must match it to resume."""
    name: str
    split: str
    source: str
    num_examples: int
    labels_sha256: str
    class_names: list[str]
    resolution: int
    shard_size: int
    latent_shape: list[int]
    vae_sha256: str
    vae_dtype: str
    scaling_factor: float
    fid_statistics: bool  # the statistics accumulate shard by shard: a resume must keep computing them
    storage_dtype: str = np.dtype(STORAGE_DTYPE).name

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)


class Preparation:
    """The files of one split's preparation under DATA_DIR/NAME/VERSION (see the module docstring)."""

    def __init__(self, out: str, name: str, split: str):
        self.version_dir = os.path.join(os.path.abspath(os.path.expanduser(out)), name, METADATA_VERSION)
        self.work_dir = os.path.join(self.version_dir, "_prepare", split)
        self.name, self.split = name, split

    def manifest_path(self) -> str:
        return os.path.join(self.work_dir, "manifest.json")

    def shard_record(self, k: int) -> str:
        return os.path.join(self.work_dir, f"shard-{k:05d}.json")

    def fid_path(self, process: int) -> str:
        return os.path.join(self.work_dir, f"fid-process{process}.npz")

    def complete_path(self) -> str:
        return os.path.join(self.work_dir, "complete.json")

    def shard_paths(self, num_shards: int) -> list[str]:
        return [os.fspath(p) for p in _template(self.version_dir, self.name, self.split).sharded_filepaths(num_shards)]

    def check_or_write_manifest(self, plan: Plan) -> None:
        """A rerun resumes only the same preparation; anything else is refused before a file is touched."""
        wanted = dataclasses.asdict(plan)
        if os.path.exists(self.manifest_path()):
            with open(self.manifest_path()) as f:
                found = json.load(f)
            diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
            if diff:
                shown = {k: v if k != "class_names" else "(differ)" for k, v in diff.items()}
                raise ValueError(
                    f"{self.work_dir} holds a preparation with other settings (stored, now): {shown}. Rerun with "
                    f"the same source, VAE and flags to resume it, or write to another --out / --name.")
            return
        os.makedirs(self.work_dir, exist_ok=True)
        _write_json(self.manifest_path(), wanted)

    def done_shards(self, num_shards: int) -> set[int]:
        paths = self.shard_paths(num_shards)
        return {k for k in range(num_shards) if os.path.exists(self.shard_record(k)) and os.path.exists(paths[k])}


def _read_back(path: str, features) -> tuple[np.ndarray, np.ndarray]:
    """(labels, indices) of every record of a written shard, decoded as the trainer decodes them."""
    reader = array_record_module.ArrayRecordReader(path)
    try:
        records = reader.read_all()
    finally:
        reader.close()
    decoded = [features.deserialize_example_np(r) for r in records]
    return (np.asarray([d["label"] for d in decoded], np.int64), np.asarray([d["index"] for d in decoded], np.int64))


def write_shard(k: int, plan: Plan, prep: Preparation, source: ImageSource, encode: Encoder, features, *,
                batch: int, pool: concurrent.futures.Executor, fid: tuple[Callable, FidAccumulator, str] | None,
                progress: Callable[[int], None], kill_now: Callable[[int], bool]) -> None:
    start, stop = k * plan.shard_size, min((k + 1) * plan.shard_size, plan.num_examples)
    final = prep.shard_paths(plan.num_shards)[k]
    tmp = f"{final}.tmp.{os.getpid()}"
    load = lambda i: center_crop(source.load(i), plan.resolution)
    batches = [range(b, min(b + batch, stop)) for b in range(start, stop, batch)]
    shard_fid = FidAccumulator() if fid is not None and k not in fid[1].shards else None
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        pending = [pool.submit(load, i) for i in batches[0]]
        for j, indices in enumerate(batches):
            pixels = np.stack([p.result() for p in pending])
            if j + 1 < len(batches):  # decode the next batch while this one is encoded
                pending = [pool.submit(load, i) for i in batches[j + 1]]
            mean, std = encode(pixels)
            if not (np.isfinite(mean).all() and np.isfinite(std).all()):
                raise ValueError(f"examples {indices.start}..{indices.stop - 1}: the VAE posterior is not finite in "
                                 f"{np.dtype(STORAGE_DTYPE).name} (|mean| > 65504 or NaN): check the VAE weights")
            for r, i in enumerate(indices):
                writer.write(features.serialize_example(
                    {"mean": mean[r], "std": std[r], "label": int(source.labels[i]), "index": i}))
            if shard_fid is not None:
                shard_fid.add(fid[0](pixels))
            progress(len(indices))
            if kill_now(j):
                writer.close()
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        writer.close()
    labels, indices = _read_back(tmp, features)
    if not (np.array_equal(indices, np.arange(start, stop)) and np.array_equal(labels, source.labels[start:stop])):
        raise RuntimeError(f"shard {k} read back from {tmp} does not hold examples {start}..{stop - 1} with their "
                           "labels in order; the file was left for inspection")
    os.replace(tmp, final)
    if shard_fid is not None:
        shard_fid.shards = {k}
        fid[1].merge(shard_fid)
        fid[1].save(fid[2])  # before the shard record: a recorded shard is always in the statistics
    _write_json(prep.shard_record(k), {"shard": k, "start": start, "stop": stop, "labels_sha256": labels_sha256(labels),
                                       "num_bytes": os.path.getsize(final)})


def finalize(plan: Plan, prep: Preparation, features, *, process_count: int, fid_ref_out: str) -> dict:
    """Check the whole split against the source, then publish the TFDS metadata (and the FID statistics)."""
    records = []
    for k in range(plan.num_shards):
        if not os.path.exists(prep.shard_record(k)):
            raise RuntimeError(f"shard {k} of {plan.num_shards} has no record in {prep.work_dir}: rerun the command "
                               "(it resumes) until every process has finished")
        with open(prep.shard_record(k)) as f:
            records.append(json.load(f))
    bounds = [(r["start"], r["stop"]) for r in records]
    size, n = plan.shard_size, plan.num_examples
    expected = [(k * size, min((k + 1) * size, n)) for k in range(plan.num_shards)]
    count = sum(stop - start for start, stop in bounds)
    if bounds != expected or count != plan.num_examples:
        raise RuntimeError(f"shards cover {count} examples in {bounds[:3]}..., the source has {plan.num_examples}")
    # Per-shard label hashes (each from the shard as read back) against the source's labels cut the same way.
    combined = hashlib.sha256("".join(r["labels_sha256"] for r in records).encode()).hexdigest()
    source_labels = np.load(os.path.join(prep.work_dir, "labels.npy"))
    want = hashlib.sha256("".join(labels_sha256(source_labels[a:b]) for a, b in expected).encode()).hexdigest()
    if combined != want or labels_sha256(source_labels) != plan.labels_sha256:
        raise RuntimeError(f"the labels stored in {prep.version_dir} do not match the source's (hash {combined} vs "
                           f"{want}): delete {prep.work_dir} and the split's shards, then prepare again")

    result = {"split": plan.split, "num_examples": count, "labels_sha256": plan.labels_sha256,
              "num_shards": plan.num_shards}
    if fid_ref_out:
        acc = FidAccumulator()
        for p in range(process_count):
            acc.merge(FidAccumulator.load(prep.fid_path(p)))
        if acc.shards != set(range(plan.num_shards)) or acc.count != plan.num_examples:
            raise RuntimeError(f"FID statistics cover shards {sorted(acc.shards)[:5]}... ({acc.count} images), not "
                               f"all {plan.num_shards} ({plan.num_examples} images): rerun with the same processes")
        mu, sigma = acc.statistics()
        os.makedirs(os.path.dirname(os.path.abspath(fid_ref_out)), exist_ok=True)
        _atomic_write(fid_ref_out, lambda f: np.savez(f, mu=mu, sigma=sigma))
        result["fid_ref_out"] = fid_ref_out
    _write_json(prep.complete_path(), dict(result, num_bytes=sum(r["num_bytes"] for r in records),
                                           shard_lengths=[b - a for a, b in bounds]))

    # Every complete split of this dataset goes into the metadata (a second split prepared later joins the first).
    split_infos = []
    for split in sorted(os.listdir(os.path.join(prep.version_dir, "_prepare"))):
        path = os.path.join(prep.version_dir, "_prepare", split, "complete.json")
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=done["shard_lengths"],
                                                   num_bytes=done["num_bytes"]))
    write_metadata(prep.version_dir, plan.name, features, split_infos,
                   description=f"VAE posteriors (mean, std; image and horizontal flip) of {plan.source} at "
                               f"{plan.resolution}px (ADM centre crop), written by hd.data.prepare_latents.",
                   scaling_factor=plan.scaling_factor, vae_sha256=plan.vae_sha256, resolution=plan.resolution,
                   source=plan.source, storage_dtype=plan.storage_dtype)
    return result


def write_metadata(version_dir: str, name: str, features, split_infos: list, description: str,
                   **metadata: Any) -> None:
    """TFDS metadata for the ArrayRecord shards of every split in `split_infos`, already in `version_dir`
    (NAME-SPLIT.array_record-XXXXX-of-YYYYY). dataset_info.json is what makes the dataset visible to
    `tfds.builder_from_directory` and hd.data; `metadata` goes to metadata.json."""
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir, features=features, split_infos=split_infos,
        filename_template=_template(version_dir, name, None), version=METADATA_VERSION, check_data=False,
        description=description, metadata=tfds.core.MetadataDict(**metadata))


def vae_fingerprint(vae_dir: str) -> str:
    """sha256 over the VAE folder's config and weights: a resume with other weights is refused."""
    return hashlib.sha256("".join(file_sha256(os.path.join(vae_dir, n)) for n in (CONFIG_NAME, WEIGHTS_NAME))
                          .encode()).hexdigest()


def default_name(source: str, resolution: int) -> str:
    """imagenet256_latents for tfds:imagenet2012, <folder name><resolution>_latents for a folder."""
    kind, _, arg = source.partition(":")
    base = "imagenet" if kind == "tfds" else os.path.basename(os.path.normpath(arg)) or "images"
    return f"{base}{resolution}_latents"


def prepare(*, source: str, vae_dir: str, out: str, resolution: int, split: str = "train", name: str = "",
            batch: int = 64, shard_size: int = 10_000, workers: int = 8, manual_dir: str = "", vae_sha256: str = "",
            vae_dtype: str = "float32", inception_weights: str = "", inception_sha256: str = "",
            fid_ref_out: str = "") -> dict:
    """Prepare (or resume) one split; returns a summary (process 0: after the final checks)."""

    if resolution <= 0 or batch <= 0 or shard_size <= 0 or workers <= 0:
        raise ValueError(f"--resolution={resolution}, --batch={batch}, --shard_size={shard_size} and "
                         f"--workers={workers} must all be positive")
    if bool(inception_weights) != bool(fid_ref_out):
        raise ValueError("--inception_weights and --fid_ref_out go together: give both (FID reference statistics) "
                         "or neither")
    name = name or default_name(source, resolution)
    prep = Preparation(out, name, split)
    images = open_image_source(source, split, manual_dir or default_manual_dir(), prep.work_dir)
    vae = load_vae(vae_dir, sha256=vae_sha256, dtype=vae_dtype)
    factor = vae.module.downsampling
    if resolution % factor:
        raise ValueError(f"--resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    latent_shape = [resolution // factor, resolution // factor, vae.module.latent_channels]
    plan = Plan(name=name, split=split, source=images.spec, num_examples=len(images.labels),
                labels_sha256=labels_sha256(images.labels), class_names=list(images.class_names),
                resolution=resolution, shard_size=shard_size, latent_shape=latent_shape,
                vae_sha256=vae_fingerprint(vae_dir), vae_dtype=vae_dtype, scaling_factor=vae.scaling_factor,
                fid_statistics=bool(inception_weights))
    inception = None
    if inception_weights:  # checked (hash) before anything is written
        variables = load_inception_params(inception_weights, inception_sha256 or None)
        inception = lambda pixels: np.asarray(inception_features(variables, pixels)["pool"])
    pid, nproc = jax.process_index(), jax.process_count()
    complete = os.path.exists(prep.complete_path())
    if fid_ref_out and os.path.exists(fid_ref_out) and not complete:
        raise FileExistsError(f"--fid_ref_out={fid_ref_out} exists; it is never overwritten: choose another path")
    if pid == 0:
        prep.check_or_write_manifest(plan)  # creates the work directory: every input was checked by now
        if not os.path.exists(os.path.join(prep.work_dir, "labels.npy")):
            _atomic_write(os.path.join(prep.work_dir, "labels.npy"), lambda f: np.save(f, images.labels))
    if nproc > 1:
        multihost_utils.sync_global_devices("prepare_latents: manifest")
        prep.check_or_write_manifest(plan)  # written by process 0 by now: every process checks it
    if complete:
        with open(prep.complete_path()) as f:
            logging.info("%s split %s is already prepared in %s", name, split, prep.version_dir)
            return json.load(f)

    features = features_dict(tuple(latent_shape), plan.class_names)
    done = prep.done_shards(plan.num_shards)
    mine = [k for k in range(pid, plan.num_shards, nproc) if k not in done]
    todo = sum(min((k + 1) * shard_size, plan.num_examples) - k * shard_size for k in mine)
    logging.info("%s/%s: %d examples in %d shards of %d; %d shards done earlier, this process (%d of %d) writes "
                 "%d (%d examples) to %s", name, split, plan.num_examples, plan.num_shards, shard_size, len(done),
                 pid, nproc, len(mine), todo, prep.version_dir)

    fid = None if inception is None else (inception, FidAccumulator.load(prep.fid_path(pid)), prep.fid_path(pid))
    encode = make_encoder(vae, batch)

    t0, written, last_log = time.perf_counter(), 0, [time.perf_counter()]

    def progress(n: int) -> None:
        nonlocal written
        written += n
        now = time.perf_counter()
        if now - last_log[0] >= 30 or written == todo:
            rate = written / (now - t0)
            logging.info("%s/%s: %d/%d images this run, %.1f images/s, ETA %.1f min", name, split, written, todo,
                         rate, (todo - written) / rate / 60)
            last_log[0] = now

    kill_after = os.environ.get(KILL_ENV)
    committed = [0]
    kill_now = lambda j: kill_after is not None and committed[0] >= int(kill_after) and j >= 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
        for k in mine:
            write_shard(k, plan, prep, images, encode, features, batch=batch, pool=pool, fid=fid, progress=progress,
                        kill_now=kill_now)
            committed[0] += 1
    if nproc > 1:
        multihost_utils.sync_global_devices("prepare_latents: shards written")
    if pid != 0:
        return {"split": split, "shards_written": len(mine)}
    result = finalize(plan, prep, features, process_count=nproc, fid_ref_out=fid_ref_out)
    logging.info("%s/%s: verified %d examples (labels sha256 %s); dataset ready: --config.data.data_dir=%s "
                 "--config.data.tfds_name=%s", name, split, result["num_examples"], result["labels_sha256"],
                 os.path.dirname(os.path.dirname(prep.version_dir)), name)
    return result


def main(argv: Sequence[str]) -> None:
    del argv
    parallel.run_processes(lambda: print(json.dumps(prepare(
        source=_SOURCE.value, vae_dir=_VAE.value, out=_OUT.value, resolution=_RESOLUTION.value, split=_SPLIT.value,
        name=_NAME.value, batch=_BATCH.value, shard_size=_SHARD_SIZE.value, workers=_WORKERS.value,
        manual_dir=_MANUAL_DIR.value, vae_sha256=_VAE_SHA256.value, vae_dtype=_VAE_DTYPE.value,
        inception_weights=_INCEPTION.value, inception_sha256=_INCEPTION_SHA256.value,
        fid_ref_out=_FID_REF_OUT.value))), _DISTRIBUTED)


if __name__ == "__main__":
    _SOURCE = flags.DEFINE_string("source", None, "tfds:imagenet2012 or folder:/path (one sub-folder per class).")
    _VAE = flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (config.json + safetensors weights).")
    _VAE_SHA256 = flags.DEFINE_string("vae_sha256", "", "Expected sha256 of the VAE's safetensors file.")
    _VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
    _OUT = flags.DEFINE_string("out", None, "TFDS data dir to write NAME/1.0.0/ into (the config's data.data_dir).")
    _NAME = flags.DEFINE_string("name", "", "Dataset name (the config's data.tfds_name); default imagenet<res>_latents "
                                "for tfds:imagenet2012, <folder name><res>_latents for a folder.")
    _RESOLUTION = flags.DEFINE_integer("resolution", 256, "Centre-crop size in pixels.")
    _SPLIT = flags.DEFINE_string("split", "train", "Split to prepare (imagenet2012: train | validation).")
    _BATCH = flags.DEFINE_integer("batch", 64, "Images per encoder call on this process (split over its devices).")
    _SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Examples per ArrayRecord shard (the unit of resume).")
    _WORKERS = flags.DEFINE_integer("workers", 8, "Threads decoding and cropping images.")
    _MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "TFDS manual_dir with the ILSVRC2012 tars (tfds:imagenet2012).")
    _INCEPTION = flags.DEFINE_string("inception_weights", "", "FID InceptionV3 weights file: also write FID stats.")
    _INCEPTION_SHA256 = flags.DEFINE_string("inception_sha256", "", "Expected sha256 of --inception_weights.")
    _FID_REF_OUT = flags.DEFINE_string("fid_ref_out", "", "ADM-style reference statistics (.npz: mu, sigma) to write.")
    _DISTRIBUTED = parallel.define_distributed_flags()
    flags.mark_flags_as_required(["source", "vae", "out"])
    app.run(main)
