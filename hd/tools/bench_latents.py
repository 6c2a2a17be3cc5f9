"""Latent batches/s per host from a VAE-posterior ArrayRecord dataset, against what an XL/2 step consumes.

    python -m hd.tools.bench_latents [--examples=20000] [--batch=256] [--batches=30] [--dir=DIR]

Writes a synthetic dataset exactly as hd.data.prepare_latents does (float16 mean and std [2, 32, 32, 4] per
example, both flips, ArrayRecord shards, TFDS metadata) into --dir (default: a temporary folder, removed at
the end), then times the trainer's iterator on it: hd.data.BatchIterator over the posterior source read batch by
batch through `tfds.data_source` (max_in_memory_mb=0, as for ImageNet), each example's latent drawn from
(seed, position). Reported: batches/s split into reading (data source) and drawing (flip + noise), the CPU
time per batch (all threads; the draw runs in min(8, CPUs) threads) and the goal, met or not on this host, with
the cores the goal takes at the measured CPU time per batch.

The goal (at least 10x the consumption of the training step): one step of the XL/2 sketch stage is
--step_flops (4.29e14, the README's compile check of configs/imagenet256.py:sketch on v4:2x2x4) over --chips
chips of --chip_flops peak at --mfu utilisation; each of --hosts hosts feeds global_batch / hosts examples per
step. Goal batches/s per host (of --batch examples) = 10 x steps/s x global_batch / hosts / batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from array_record.python import array_record_module

from hd.config import base_config
from hd.data import make_batch_iterator
from hd.data.prepare_latents import METADATA_VERSION, _template, features_dict, write_metadata

GOAL_FACTOR = 10.0


def write_synthetic(directory: str, examples: int, *, latent_shape=(32, 32, 4), shard_size: int = 5000,
                    num_classes: int = 1000, seed: int = 0, name: str = "bench_latents") -> str:
    """A posterior dataset of random float16 values in prepare_latents' format; returns the TFDS data dir."""

    version_dir = os.path.join(directory, name, METADATA_VERSION)
    os.makedirs(version_dir, exist_ok=True)
    features = features_dict(tuple(latent_shape), [f"c{i}" for i in range(num_classes)])
    num_shards = -(-examples // shard_size)
    paths = _template(version_dir, name, "train").sharded_filepaths(num_shards)
    rng = np.random.default_rng(seed)
    lengths, num_bytes = [], 0
    for k, path in enumerate(paths):
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
        indices = range(k * shard_size, min((k + 1) * shard_size, examples))
        for i in indices:
            mean = rng.standard_normal((2, *latent_shape), np.float32).astype(np.float16)
            record = features.serialize_example({"mean": mean, "std": np.abs(mean) * 0.01, "label": i % num_classes,
                                                 "index": i})
            num_bytes += len(record)
            writer.write(record)
        writer.close()
        lengths.append(len(indices))
    split = tfds.core.SplitInfo(name="train", shard_lengths=lengths, num_bytes=num_bytes)
    write_metadata(version_dir, name, features, [split], description="synthetic posteriors (hd.tools.bench_latents)",
                   scaling_factor=0.18215)
    return directory


def goal_batches_per_s(*, step_flops: float, chips: int, chip_flops: float, mfu: float, hosts: int,
                       global_batch: int, batch: int) -> dict:
    steps_per_s = mfu * chips * chip_flops / step_flops
    consumed = steps_per_s * global_batch / hosts / batch  # batches of `batch` examples per host per second
    return {"step_s": 1.0 / steps_per_s, "steps_per_s": steps_per_s, "consumed_batches_per_s_per_host": consumed,
            "goal_batches_per_s_per_host": GOAL_FACTOR * consumed}


def measure(data_dir: str, *, batch: int, batches: int, seed: int = 0, name: str = "bench_latents") -> dict:

    c = base_config().data
    c = ml_collections.ConfigDict(c.to_dict())
    c.update(name="tfds", tfds_name=name, data_dir=data_dir, num_classes=1000, latent_posterior=True,
             max_in_memory_mb=0)
    data = make_batch_iterator(c, global_batch_size=batch, seed=seed)
    source = data.source
    next(data)  # first-touch costs
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch_out = next(data)
    total = (time.perf_counter() - t0) / batches
    cpu = (time.process_time() - c0) / batches  # all threads: what a batch costs, whatever else the host runs
    # The two parts of a batch, timed apart on the same indices.
    indices = np.random.default_rng(seed).permutation(source.num_examples)[:batch]
    t0 = time.perf_counter()
    for _ in range(max(1, batches // 3)):
        source.read(indices)
    read = (time.perf_counter() - t0) / max(1, batches // 3)
    return {"batch": batch, "batches_timed": batches, "seconds_per_batch": total, "batches_per_s": 1.0 / total,
            "cpu_seconds_per_batch": cpu, "read_seconds_per_batch": read,
            "draw_seconds_per_batch": max(total - read, 0.0),
            "x_shape": list(batch_out["x"].shape)}


def main(argv) -> None:
    del argv
    directory = FLAGS.dir or tempfile.mkdtemp(prefix="hd-bench-latents-")
    try:
        t0 = time.perf_counter()
        write_synthetic(directory, FLAGS.examples)
        written = time.perf_counter() - t0
        result = measure(directory, batch=FLAGS.batch, batches=FLAGS.batches)
    finally:
        if not FLAGS.dir:
            shutil.rmtree(directory, ignore_errors=True)
    goal = goal_batches_per_s(step_flops=FLAGS.step_flops, chips=FLAGS.chips, chip_flops=FLAGS.chip_flops,
                              mfu=FLAGS.mfu, hosts=FLAGS.hosts, global_batch=FLAGS.global_batch, batch=FLAGS.batch)
    result.update(goal, examples=FLAGS.examples, write_seconds=written, load_average=os.getloadavg()[0],
                  cpus=os.cpu_count(), goal_met=bool(result["batches_per_s"] >= goal["goal_batches_per_s_per_host"]),
                  cores_for_goal=goal["goal_batches_per_s_per_host"] * result["cpu_seconds_per_batch"])
    print(json.dumps(result, indent=1))
    print(f"latent batches/s per host (batch {FLAGS.batch}, tfds.data_source): {result['batches_per_s']:.1f} "
          f"(read {result['read_seconds_per_batch'] * 1e3:.0f} ms + draw {result['draw_seconds_per_batch'] * 1e3:.0f} "
          f"ms per batch); XL/2 sketch step {goal['step_s'] * 1e3:.0f} ms at {FLAGS.mfu:.0%} MFU on {FLAGS.chips} "
          f"chips consumes {goal['consumed_batches_per_s_per_host']:.2f} batches/s per host (of {FLAGS.hosts}); goal "
          f">= {goal['goal_batches_per_s_per_host']:.1f}: {'MET' if result['goal_met'] else 'NOT MET'} on this host "
          f"({result['cpus']} CPUs, load average {result['load_average']:.1f}); "
          f"{result['cpu_seconds_per_batch'] * 1e3:.0f} CPU-ms per batch, so the goal takes "
          f"{result['cores_for_goal']:.2f} cores")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_integer("examples", 20_000, "Synthetic examples to write (32 KiB each: mean and std, both flips).")
    flags.DEFINE_integer("batch", 256, "Examples per batch on this host.")
    flags.DEFINE_integer("batches", 30, "Batches timed.")
    flags.DEFINE_string("dir", "", "Where to write the dataset (kept); default a temporary folder (removed).")
    flags.DEFINE_float("step_flops", 4.29e14, "FLOPs of one train step (README compile check, XL/2 sketch).")
    flags.DEFINE_integer("chips", 16, "Chips of the slice (v4:2x2x4).")
    flags.DEFINE_float("chip_flops", 275e12, "Peak bfloat16 FLOP/s per chip (TPU v4).")
    flags.DEFINE_float("mfu", 0.5, "Assumed utilisation of the step.")
    flags.DEFINE_integer("hosts", 4, "Hosts feeding the slice (v4:2x2x4: 4 hosts of 4 chips).")
    flags.DEFINE_integer("global_batch", 256, "Global batch of the step.")
    app.run(main)
