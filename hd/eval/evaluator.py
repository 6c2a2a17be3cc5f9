"""Sample from any stage's checkpoint and score the samples the same way for every row.

A row is one model at one sampler setting: the teacher with Euler or Heun at N steps, or a one-step
generator (sketch, refine) at k mean-flow steps. Every row uses the same noise, labels (balanced classes),
feature network and reference set, so rows compare. Results go to results.json and results.md; one sample
grid per row (one row of the grid per class) goes to grids/.

With config.eval.feature_net='inception' the rows are scored by `evaluate_inception` (FID, Inception Score,
precision/recall at the paper's scale): samples are decoded by a VAE when they are latents, computed in
resumable chunks over every device, optionally exported in the ADM evaluator's .npz format, and each row
reports its cost per image (seconds and GFLOP) for the sampler, the decode and Inception apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hd import flow, parallel, sampling, visualize
from hd.checkpoint import read_ema_params
from hd.costs import lowered_cost
from hd.data import load_source
from hd.eval import heatmaps
from hd.eval.classifier import classify, reference_data, train_classifier
from hd.eval.frechet import feature_statistics, frechet_distance, frechet_distance_to_features
from hd.eval.inception import file_sha256, inception_features, load_inception_params, quantize_to_uint8
from hd.eval.inception_score import inception_score
from hd.eval.precision_recall import precision_recall
from hd.files import replace_json, replace_text
from hd.models import abstract_params, average_velocity_apply, build_model, velocity_apply
from hd.models.vae import load_vae


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # e.g. "teacher", "sketch", "refine"
    workdir: str
    sampler: str  # euler | heun | mean_flow
    steps: int
    # Teacher guidance of this row; None = config.eval.cfg_scale. One-step students carry the guidance they
    # were distilled with (the sketch's teacher target), so their rows have none.
    cfg_scale: float | None = None

    @property
    def nfe(self) -> int:
        """Sampler calls of the network per image (a guided call runs both CFG branches as one batched call)."""
        return self.steps if self.sampler == "mean_flow" else flow.ode_nfe(self.steps, self.sampler)

    def forward_passes(self, default_cfg_scale: float) -> int:
        """Network forward passes per image: a guided call (scale != 1) is two, conditional and unconditional."""
        scale = default_cfg_scale if self.cfg_scale is None else self.cfg_scale
        return self.nfe * (2 if self.sampler != "mean_flow" and scale != 1.0 else 1)

    @property
    def label(self) -> str:
        cfg = "" if self.cfg_scale is None else f"/cfg-{self.cfg_scale:g}"
        return f"{self.name}/{self.sampler}-{self.steps}{cfg}"

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return self.label.replace("/", "_")


def rows_from_config(config: ml_collections.ConfigDict) -> list[Row]:
    ev = config.eval
    rows = []
    if ev.teacher_workdir:
        # One teacher row per (sampler, steps, guidance scale) when scales are listed; else cfg_scale for all.
        scales = tuple(float(w) for w in ev.get("guidance_scales", ())) or (None,)
        rows += [Row("teacher", ev.teacher_workdir, "euler", n, w) for n in ev.teacher_euler_steps for w in scales]
        rows += [Row("teacher", ev.teacher_workdir, "heun", n, w) for n in ev.teacher_heun_steps for w in scales]
    for entry in filter(None, (s.strip() for s in ev.students.split(","))):
        if "=" not in entry:
            raise ValueError(f"config.eval.students entry {entry!r} is not NAME=WORKDIR")
        name, workdir = entry.split("=", 1)
        rows += [Row(name, workdir, "mean_flow", n) for n in ev.student_steps]
    if not rows:
        raise ValueError("nothing to evaluate: set config.eval.teacher_workdir and/or config.eval.students "
                         "(NAME=WORKDIR,...)")
    return rows


def _sampler(model, row: Row, num_classes: int, cfg_scale: float) -> sampling.Sampler:
    """The row's sampler from hd.sampling; cfg_scale is the evaluation's default, row.cfg_scale overrides it."""
    if row.sampler == "mean_flow":
        return sampling.mean_flow_sampler(model, row.steps)
    return sampling.ode_sampler(model, num_classes, row.steps, row.sampler,
                                cfg_scale if row.cfg_scale is None else row.cfg_scale)


class FeatureNet:
    """Maps samples to features (and class predictions when available); built once per evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        ev = config.eval
        self.kind = ev.feature_net
        self.num_classes = config.data.num_classes
        if self.kind == "classifier":
            self.params, self.accuracy = train_classifier(config.data, os.path.join(workdir, "feature_net"),
                                                          num_steps=ev.classifier_steps)
            logging.info("feature classifier test accuracy: %.4f", self.accuracy)
        elif self.kind == "inception":
            self.variables = load_inception_params(ev.inception_weights, ev.inception_sha256 or None)
            self.accuracy = None
        else:
            raise ValueError(f"config.eval.feature_net={self.kind!r} is not 'classifier' or 'inception'")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.kind == "classifier":
            return classify(self.params, self.num_classes, x)
        pools = [np.asarray(inception_features(self.variables, jnp.asarray(x[i:i + 100]))["pool"])
                 for i in range(0, len(x), 100)]
        return np.concatenate(pools), None


class SampleScorer:
    """Scores samples drawn from fixed noise and balanced labels against the reference set: FD, precision,
    recall and class-consistency. Used for every row of an evaluation and inside training (config.eval_every)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, reference: dict | None = None):
        ev = config.eval
        self.features = FeatureNet(config, workdir)
        self.num_samples = ev.num_samples
        self.nearest_k = ev.nearest_k
        if reference is None:
            reference = reference_data(config.data, ev.num_samples)
        self.data_shape = tuple(reference["x"].shape[1:])
        if ev.reference_npz:
            with np.load(ev.reference_npz) as stats:
                self.ref_mu, self.ref_sigma = stats["mu"], stats["sigma"]
            self.ref_features = None
        else:
            self.ref_features, _ = self.features(reference["x"])
            self.ref_mu, self.ref_sigma = feature_statistics(self.ref_features)
        self.labels = np.arange(ev.num_samples, dtype=np.int32) % config.data.num_classes
        self.noise = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 777),
                                                  (ev.num_samples, *self.data_shape)))

    def score(self, samples: np.ndarray) -> dict:
        fake_features, predictions = self.features(samples)
        mu, sigma = feature_statistics(fake_features)
        out = {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
        if self.ref_features is not None:
            out.update(precision_recall(self.ref_features, fake_features, k=self.nearest_k))
        out["class_consistency"] = None if predictions is None else float(np.mean(predictions == self.labels))
        return out


def evaluate(config: ml_collections.ConfigDict, workdir: str, rows: list[Row] | None = None,
             feature_workdir: str | None = None) -> list[dict]:
    """Score every row; write results.json, results.md and grids/ under `workdir`; return the entries. The
    classifier is cached under `feature_workdir` (default `workdir`): another evaluation's directory shares it."""
    ev = config.eval
    if ev.feature_net == "inception":  # FID / IS at scale: chunked, resumable, optionally through a VAE
        return evaluate_inception(config, workdir, rows)
    rows = rows_from_config(config) if rows is None else rows
    reference = reference_data(config.data, ev.num_samples)
    data_shape = tuple(reference["x"].shape[1:])
    model = build_model(config.model, data_shape, config.data.num_classes)
    abstract = abstract_params(model, data_shape)
    flops_per_evaluation = _flops_per_evaluation_cache(config, data_shape, abstract)
    # Read every checkpoint first: a missing or mismatched one fails before any sampling.
    params = {wd: read_ema_params(model, data_shape, wd)[0] for wd in {r.workdir for r in rows}}

    scorer = SampleScorer(config, feature_workdir or workdir, reference)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch_sharding = parallel.batch_sharding(mesh)
    n, bs = ev.num_samples, ev.batch_size
    if n % bs or bs % jax.device_count():
        raise ValueError(f"config.eval.num_samples={n} must be a multiple of config.eval.batch_size={bs}, itself "
                         f"a multiple of the {jax.device_count()} devices")
    labels = scorer.labels
    noise = [scorer.noise[i * bs:(i + 1) * bs] for i in range(n // bs)]
    # Grid: the first `per_class` samples of each class (labels cycle through the classes), one row per class;
    # the same noise in every row of the results, so grids compare by eye.
    per_class = min(10, n // config.data.num_classes)
    grid_index = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(config.data.num_classes)])

    entries = []
    os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
    # Sampling time grows with NFE: the ETA scales the seconds per NFE so far by the NFE still to come.
    total_nfe, done_nfe, sampling_seconds = sum(r.nfe for r in rows), 0, 0.0
    for index, row in enumerate(rows):
        sample = jax.jit(_sampler(model, row, config.data.num_classes, ev.cfg_scale),
                         in_shardings=(parallel.replicated(mesh), batch_sharding, batch_sharding),
                         out_shardings=parallel.replicated(mesh))  # every process reads all samples
        row_params = jax.device_put(params[row.workdir], parallel.replicated(mesh))
        put = lambda a: jax.device_put(a, batch_sharding)
        jax.block_until_ready(sample(row_params, put(noise[0]), put(labels[:bs])))  # compile outside the timing
        start = time.perf_counter()
        outputs = [np.asarray(sample(row_params, put(z), put(labels[i * bs:(i + 1) * bs])))
                   for i, z in enumerate(noise)]
        seconds = time.perf_counter() - start
        samples = np.concatenate(outputs)
        done_nfe, sampling_seconds = done_nfe + row.nfe, sampling_seconds + seconds

        gflop = flops_per_evaluation(row) * row.nfe / 1e9
        entry = dict(model=row.name, sampler=row.sampler, steps=row.steps, nfe=row.nfe,
                     forward_passes=row.forward_passes(ev.cfg_scale), gflop_per_image=gflop, **scorer.score(samples),
                     n_samples=n, seconds_per_image=seconds / n, feature_net=scorer.features.kind,
                     feature_net_test_accuracy=scorer.features.accuracy, workdir=os.path.abspath(row.workdir))
        # Images at 3x (nearest): 28-pixel samples are hard to judge at their own size.
        grid = visualize.points_image(samples) if len(data_shape) == 1 else visualize.image_grid(
            samples[grid_index], config.data.num_classes, upscale=3)
        cfg = "" if row.cfg_scale is None else f"_cfg{row.cfg_scale:g}"
        grid_path = os.path.join(workdir, "grids", f"{row.name}_{row.sampler}_{row.steps}{cfg}.png")
        # Where an AWD head looks on these samples (refine rows with an AWD head; None otherwise). Every process
        # calls it: reading the critic is collective.
        heat = None if len(data_shape) == 1 else heatmaps.run_heatmap_grid(
            row.workdir, samples[grid_index], labels[grid_index], config.data.num_classes)
        if jax.process_index() == 0:
            visualize.save_png(grid, grid_path)
            if heat is not None:
                visualize.save_png(heat, grid_path[:-4] + "_awd.png")
        entry["grid"] = grid_path
        if heat is not None:
            entry["awd_heatmap"] = grid_path[:-4] + "_awd.png"
        logging.info("%s: fd %.3f precision %.3f recall %.3f class-consistency %s (%.2f ms/image)", row.label,
                     entry["fd"], entry.get("precision", float("nan")), entry.get("recall", float("nan")),
                     entry["class_consistency"], 1e3 * entry["seconds_per_image"])
        logging.info("eval row %d/%d done; ETA %.0f s", index + 1, len(rows),
                     sampling_seconds / done_nfe * (total_nfe - done_nfe))
        entries.append(entry)

    if jax.process_index() == 0:
        write_results(entries, workdir)
    return entries


def results_table(entries: list[dict]) -> str:
    if entries and "inception_score" in entries[0]:
        return inception_results_table(entries)
    # NFE counts sampler calls; a guided call runs both CFG branches in one batched call, so it is two forward
    # passes: the "passes" column counts those, and GFLOP/image is XLA's count of them.
    header = ("| model | sampler | steps | NFE (calls) | forward passes | GFLOP/image | FD | precision | recall | "
              "class-consistency | ms/image |")
    lines = [header, "|" + "---|" * 11]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    for e in entries:
        lines.append(f"| {e['model']} | {e['sampler']} | {e['steps']} | {e['nfe']} | {fmt(e.get('forward_passes'), 'd')} | "
                     f"{fmt(e.get('gflop_per_image'), '.3f')} | {e['fd']:.3f} | "
                     f"{fmt(e.get('precision'), '.3f')} | {fmt(e.get('recall'), '.3f')} | "
                     f"{fmt(e['class_consistency'], '.3f')} | {1e3 * e['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def inception_results_table(entries: list[dict]) -> str:
    """Rows of evaluate_inception: FID, IS, precision/recall, then cost per image, split into the sampler (all
    NFE), the VAE decode and the Inception network, in seconds and in GFLOP (XLA's cost analysis)."""
    header = ("| model | sampler | steps | NFE | CFG | FID | IS | precision | recall | s/image: sampler / decode / "
              "Inception | GFLOP/image: sampler / decode / Inception |")
    lines = [header, "|" + "---|" * 11]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['sampler']} | {e['steps']} | {e['nfe']} | {fmt(e['cfg_scale'], 'g')} | "
            f"{e['fd']:.3f} | {e['inception_score']:.2f} | {fmt(e['precision'], '.3f')} | {fmt(e['recall'], '.3f')} | "
            f"{e['sampler_seconds_per_image']:.4g} / {e['decode_seconds_per_image']:.4g} / "
            f"{e['inception_seconds_per_image']:.4g} | {e['sampler_gflop_per_image']:.4g} / "
            f"{e['decode_gflop_per_image']:.4g} / {e['inception_gflop_per_image']:.4g} |")
    return "\n".join(lines)


def write_results(entries: list[dict], workdir: str, name: str = "results") -> None:
    """NAME.json (every field) and NAME.md (the table, after a line naming the feature net) in `workdir`."""
    path = os.path.join(workdir, name)
    replace_json(path + ".json", entries)
    first = entries[0]
    note = (f"Features: {first['feature_net']}"
            + (f" (test accuracy {first['feature_net_test_accuracy']:.4f})" if first["feature_net_test_accuracy"]
               else "") + f"; {first['n_samples']} samples per row.\n\n")
    replace_text(path + ".md", note + results_table(entries) + "\n")


# --- Inception evaluation at the paper's scale: FID / IS / precision-recall, chunked and resumable -------------
#
# samples (latents) -> VAE decode of latents / scaling_factor -> uint8 (inception.quantize_to_uint8) ->
# FID InceptionV3 (pool features, 1008 logits). Sample j has label j % num_classes (balanced: 50 per class at
# 50,000 samples and 1,000 classes) and noise normal(fold_in(PRNGKey(seed + 777), j)), so what sample j is does
# not depend on the batch, the chunk or the number of devices. Each chunk of `chunk_size` samples is sharded
# over every device of every process; its features, logits and timings are written atomically (process 0)
# to WORKDIR/chunks/<row>-<fingerprint>/chunk_NNNNN.npz. A rerun of the same command skips the chunks on disk,
# so an evaluation killed at any point ends with the numbers the uninterrupted one gives. A different setting
# (checkpoint step, weights, sizes, seed) has another fingerprint, hence another folder: nothing is overwritten.

_CHUNK_PREFIX = "chunk_"
_PREVIEW = 64  # samples of the first chunk kept for the row's grid


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which samples make up each chunk and batch."""
    num_samples: int
    batch_size: int
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples))

    def batch_starts(self, c: int) -> range:
        rows = self.chunk(c)
        return range(rows.start, rows.stop, self.batch_size)


def check_inception_eval(config: ml_collections.ConfigDict, num_devices: int) -> _Plan:
    """Every value the Inception evaluation reads, checked before anything loads, compiles or writes."""
    ev = config.eval
    if not ev.inception_weights or not os.path.isfile(ev.inception_weights):
        raise ValueError(f"config.eval.inception_weights={ev.inception_weights!r} is not a file: convert "
                         "pytorch-fid's weights with `python -m hd.eval.convert_inception` (README)")
    n, bs = ev.num_samples, ev.batch_size
    chunk = ev.chunk_size or 10 * bs
    if n < 2 or bs < 1 or n % bs or bs % num_devices:
        raise ValueError(f"config.eval.num_samples={n} must be a multiple of config.eval.batch_size={bs}, itself a "
                         f"multiple of the {num_devices} devices")
    if chunk < 0 or chunk % bs:
        raise ValueError(f"config.eval.chunk_size={ev.chunk_size} must be a multiple of config.eval.batch_size={bs} "
                         "(or 0 for 10 batches)")
    if ev.inception_splits < 1 or n % ev.inception_splits:
        raise ValueError(f"config.eval.num_samples={n} does not split into config.eval.inception_splits="
                         f"{ev.inception_splits} equal parts for the Inception Score")
    if ev.vae_dir:
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            if not os.path.isfile(os.path.join(ev.vae_dir, name)):
                raise ValueError(f"config.eval.vae_dir={ev.vae_dir!r} lacks {name}: point it at the diffusers "
                                 "AutoencoderKL folder the latents were made with (e.g. sd-vae-ft-ema)")
        if not tuple(config.data.example_shape):
            raise ValueError("config.eval.vae_dir is set (latent samples) but config.data.example_shape is (): set "
                             "the latent shape, e.g. --config.data.example_shape='(32, 32, 4)'")
        if not ev.reference_npz:
            raise ValueError("latent samples (config.eval.vae_dir) are scored against config.eval.reference_npz: "
                             "give the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or the statistics "
                             "hd.data.prepare_latents wrote")
    elif tuple(config.data.example_shape)[-1:] not in ((), (1,), (3,)):
        raise ValueError(f"samples of shape {tuple(config.data.example_shape)} are not images (1 or 3 channels): for "
                         "latents set config.eval.vae_dir to the VAE that decodes them")
    if ev.reference_npz and not os.path.isfile(ev.reference_npz):
        raise ValueError(f"config.eval.reference_npz={ev.reference_npz!r} is not a file")
    if ev.export_npz:
        parent = os.path.dirname(os.path.abspath(ev.export_npz))
        if not os.path.isdir(parent):
            raise ValueError(f"config.eval.export_npz={ev.export_npz!r}: folder {parent} does not exist")
        if not ev.export_npz.endswith(".npz"):
            raise ValueError(f"config.eval.export_npz={ev.export_npz!r} must end in .npz")
    return _Plan(n, bs, chunk)


def export_path(export_npz: str, row: Row, num_rows: int) -> str:
    """FILE for a single row; FILE_<row>.npz for each row of several."""
    return export_npz if num_rows == 1 else f"{export_npz[:-len('.npz')]}_{row.slug}.npz"


def _fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_chunk(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a chunk under a temporary name, flush it to disk, then rename: a file with the final name is
    always complete, whatever kills the process."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_chunk(path: str, rows: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in z.files if k != "images"}
    except Exception as e:
        raise ValueError(f"evaluation chunk {path} cannot be read ({e}); delete it and rerun to recompute it") from e
    if out.get("pool", np.empty((0,))).shape[:1] != (rows,):
        raise ValueError(f"evaluation chunk {path} holds {out.get('pool', np.empty(0)).shape[:1]} samples, not "
                         f"{rows}; delete it and rerun to recompute it")
    return out


def write_npz_streaming(path: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Any]]) -> None:
    """An .npz (the format np.savez writes: uncompressed zip of .npy files) from blocks, so 50,000 images of
    256×256 (9.8 GB) never sit in memory at once. arrays: name -> (shape, dtype, iterable of blocks along the
    first axis). Written to a temporary name and renamed when complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, blocks) in arrays.items():
                dtype = np.dtype(dtype)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                             "fortran_order": False, "shape": tuple(shape)})
                    written = 0
                    for block in blocks:
                        block = np.ascontiguousarray(block, dtype)
                        if block.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"{name}: block of shape {block.shape} in an array of shape {shape}")
                        f.write(block.tobytes())
                        written += block.shape[0]
                    if written != shape[0]:
                        raise ValueError(f"{name}: {written} rows written, {shape[0]} declared")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _agree(values: np.ndarray) -> np.ndarray:
    """Process 0's view, on every process (which chunks are on disk: all processes must skip the same ones)."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def _to_host(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array, whole, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def decode_to_uint8(decode_fn: Any, scaling_factor: float) -> Any:
    """(vae_params, latents × scaling_factor) -> uint8 images: the VAE decodes unscaled latents, the diffusion
    model works on scaled ones; then inception.quantize_to_uint8."""
    return lambda params, latents: quantize_to_uint8(decode_fn(params, latents / scaling_factor))


def evaluation_step(decode_fn: Any, scaling_factor: float) -> Any:
    """(vae_params, inception_variables, latents) -> {'pool', 'logits'}: what evaluate_inception computes per
    batch (there as two programs, timed apart), as one function for the TPU compile check."""
    to_images = decode_to_uint8(decode_fn, scaling_factor)
    return lambda vae_params, variables, latents: inception_features(variables, to_images(vae_params, latents))


class _InceptionPipeline:
    """decode (optional) -> uint8 -> Inception, jitted over the mesh; built once per evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, data_shape: tuple[int, ...]):
        ev = config.eval
        self.batch = parallel.batch_sharding(mesh)
        replicated = parallel.replicated(mesh)
        self.variables = jax.device_put(load_inception_params(ev.inception_weights, ev.inception_sha256 or None),
                                        replicated)
        self.vae = None
        if ev.vae_dir:
            self.vae = load_vae(ev.vae_dir, sha256=ev.vae_sha256)
            if self.vae.module.latent_channels != data_shape[-1]:
                raise ValueError(f"the VAE in {ev.vae_dir} has {self.vae.module.latent_channels} latent channels, the "
                                 f"samples {data_shape[-1]} (config.data.example_shape={data_shape})")
            data_scale = config.data.get("latent_scale") if config.data.get("latent_posterior", False) else None
            if data_scale is not None and abs(data_scale - self.vae.scaling_factor) > 1e-6 * abs(data_scale):
                raise ValueError(f"the model was trained on latents x config.data.latent_scale={data_scale}, but the "
                                 f"VAE in {ev.vae_dir} has scaling_factor {self.vae.scaling_factor}: use the VAE the "
                                 "latents were made with")
            self.vae_params = jax.device_put(self.vae.params, replicated)
            to_images = decode_to_uint8(self.vae.decode_fn, self.vae.scaling_factor)
        else:
            self.vae_params = None
            to_images = lambda p, x: quantize_to_uint8(x)
        features = lambda v, x: inception_features(v, x)
        self.decode = jax.jit(to_images, in_shardings=(replicated, self.batch), out_shardings=self.batch)
        self.features = jax.jit(features, in_shardings=(replicated, self.batch), out_shardings=self.batch)
        self.bs = ev.batch_size
        sample = jax.ShapeDtypeStruct((self.bs, *data_shape), jnp.float32, sharding=self.batch)
        images = jax.eval_shape(to_images, self.vae_params, jax.ShapeDtypeStruct(sample.shape, sample.dtype))
        self.image_shape = tuple(images.shape[1:])
        image_struct = jax.ShapeDtypeStruct(images.shape, jnp.uint8, sharding=self.batch)
        lowered_decode = self.decode.lower(self.vae_params, sample)
        lowered_features = self.features.lower(self.variables, image_struct)
        self.decode_c, self.features_c = lowered_decode.compile(), lowered_features.compile()
        # FLOPs per image from XLA's cost analysis of the global (pre-partitioning) programs.
        self.decode_flops = lowered_cost(to_images, (self.vae_params, sample))["flops"] / self.bs
        self.inception_flops = lowered_cost(features, (self.variables, image_struct))["flops"] / self.bs

    def images_and_features(self, samples: jax.Array) -> tuple[jax.Array, dict, float, float]:
        t0 = time.perf_counter()
        images = jax.block_until_ready(self.decode_c(self.vae_params, samples))
        t1 = time.perf_counter()
        out = jax.block_until_ready(self.features_c(self.variables, images))
        return images, out, t1 - t0, time.perf_counter() - t1

    def features_of(self, images: np.ndarray) -> np.ndarray:
        """Pool features [N, 2048] of uint8 images [N, H, W, C] (the reference set), in padded batches."""
        pools = []
        for start in range(0, len(images), self.bs):
            block = images[start:start + self.bs]
            pad = self.bs - len(block)
            if pad:
                block = np.concatenate([block, np.zeros((pad, *block.shape[1:]), block.dtype)])
            out = self.features(self.variables, jax.device_put(block, self.batch))
            pools.append(_to_host(out["pool"])[:self.bs - pad])
        return np.concatenate(pools)


def _reference(config: ml_collections.ConfigDict, pipeline: _InceptionPipeline, workdir: str) -> dict:
    """mu, sigma (float64) and, when the reference holds images (ADM's arr_0), their pool features for
    precision/recall, cached in WORKDIR beside a fingerprint of the file and the Inception weights."""
    ev = config.eval
    if not ev.reference_npz:  # pixel data: the test split, quantised like the samples
        images = np.asarray(quantize_to_uint8(reference_data(config.data, ev.num_samples)["x"]))
        features = pipeline.features_of(images)
        mu, sigma = feature_statistics(features)
        return {"mu": mu, "sigma": sigma, "features": features, "source": "test split"}
    with np.load(ev.reference_npz) as ref:
        missing = [k for k in ("mu", "sigma") if k not in ref.files]
        if missing:
            raise ValueError(f"{ev.reference_npz} lacks {missing} (has {ref.files}): an ADM reference batch holds "
                             "mu and sigma (and arr_0, the images for precision/recall)")
        mu, sigma = np.asarray(ref["mu"], np.float64), np.asarray(ref["sigma"], np.float64)
        has_images = "arr_0" in ref.files
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{ev.reference_npz}: mu {mu.shape} and sigma {sigma.shape} are not the Inception pool "
                         "statistics ((2048,), (2048, 2048))")
    out = {"mu": mu, "sigma": sigma, "features": None, "source": os.path.abspath(ev.reference_npz)}
    if not has_images:
        return out
    key = _fingerprint({"npz": file_sha256(ev.reference_npz), "inception": file_sha256(ev.inception_weights)})
    cache = os.path.join(workdir, f"reference_features-{key}.npy")
    if os.path.exists(cache):
        out["features"] = np.load(cache)
        return out
    with np.load(ev.reference_npz) as ref:
        images = ref["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{ev.reference_npz}: arr_0 must be uint8 images [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
    out["features"] = pipeline.features_of(images)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{cache}.tmp-{os.getpid()}.npy"
        np.save(tmp, out["features"])
        os.replace(tmp, cache)
    return out


def _flops_per_evaluation_cache(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], abstract: Any):
    """row -> _model_flops_per_evaluation, lowered once per (sampler kind, guidance) instead of once per row."""
    cache = {}

    def flops(row: Row) -> float:
        key = (row.sampler == "mean_flow", row.cfg_scale)
        if key not in cache:
            cache[key] = _model_flops_per_evaluation(config, row, data_shape, abstract, config.eval.cfg_scale)
        return cache[key]

    return flops


def _model_flops_per_evaluation(config: ml_collections.ConfigDict, row: Row, data_shape: tuple[int, ...],
                                abstract: Any, cfg_scale: float) -> float:
    """FLOPs per image of one network evaluation of the row's sampler (both CFG branches when guided), from XLA's
    cost analysis of the lowered call with the DiT blocks unrolled: XLA counts a loop body (the scanned blocks,
    the sampler's fori_loop) once, so the sampler's total is this × NFE."""
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    model_cfg.scan_blocks = False
    model = build_model(model_cfg, data_shape, config.data.num_classes)
    bs = config.eval.batch_size
    z = jax.ShapeDtypeStruct((bs, *data_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((bs,), jnp.float32)
    y = jax.ShapeDtypeStruct((bs,), jnp.int32)
    if row.sampler == "mean_flow":
        apply = average_velocity_apply(model)
        fn = lambda p, z, t, y: apply(p, z, t * 0, t, y)
    else:
        apply = velocity_apply(model)
        scale = cfg_scale if row.cfg_scale is None else row.cfg_scale
        fn = lambda p, z, t, y: flow.guided_velocity(lambda z, t, y: apply(p, z, t, y), config.data.num_classes,
                                                     scale)(z, t, y)
    return lowered_cost(fn, (abstract, z, t, y))["flops"] / bs


def evaluate_inception(config: ml_collections.ConfigDict, workdir: str, rows: list[Row] | None = None) -> list[dict]:
    """FID / Inception Score / precision-recall of every row (see the comment above); writes results.json,
    results.md, grids/ and the optional ADM .npz exports; returns the entries."""
    ev = config.eval
    plan = check_inception_eval(config, jax.device_count())
    rows = rows_from_config(config) if rows is None else rows
    if ev.vae_dir:
        data_shape = tuple(config.data.example_shape)
    else:
        data_shape = tuple(config.data.example_shape) or tuple(load_source(config.data).example_shape)
    model = build_model(config.model, data_shape, config.data.num_classes)
    abstract = abstract_params(model, data_shape)
    flops_per_evaluation = _flops_per_evaluation_cache(config, data_shape, abstract)
    # Read every checkpoint first: a missing or mismatched one fails before any compilation.
    checkpoints = {wd: read_ema_params(model, data_shape, wd) for wd in {r.workdir for r in rows}}
    weights = {"inception": file_sha256(ev.inception_weights),
               "vae": file_sha256(os.path.join(ev.vae_dir, "diffusion_pytorch_model.safetensors")) if ev.vae_dir
               else None}
    # Where each row's chunks live: a fingerprint of everything that defines its samples and features.
    chunk_dirs = {}
    for row in rows:
        fields = dict(row=dataclasses.asdict(row), cfg_scale=ev.cfg_scale if row.cfg_scale is None else row.cfg_scale,
                      checkpoint_step=checkpoints[row.workdir][1], plan=dataclasses.asdict(plan), seed=config.seed,
                      data_shape=data_shape, num_classes=config.data.num_classes, model=config.model.to_dict(),
                      devices=jax.device_count(), weights=weights, images=bool(ev.export_npz))
        chunk_dirs[row] = (os.path.join(workdir, "chunks", f"{row.slug}-{_fingerprint(fields)}"), fields)
    # An existing export is never overwritten; one this evaluation wrote (a rerun after a preemption) is kept.
    exports = {row: export_path(ev.export_npz, row, len(rows)) for row in rows} if ev.export_npz else {}
    exported = {row for row, path in exports.items()
                if os.path.exists(path) and _export_record(chunk_dirs[row][0]) == _file_id(path)}
    existing = [p for row, p in exports.items() if os.path.exists(p) and row not in exported]
    if existing:
        raise ValueError(f"config.eval.export_npz: {existing} already exist(s); exports are never overwritten: "
                         "move them or choose another file name")

    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    pipeline = _InceptionPipeline(config, mesh, data_shape)
    reference = _reference(config, pipeline, workdir)
    key = jax.random.PRNGKey(config.seed + 777)
    bs, num_classes = plan.batch_size, config.data.num_classes

    entries = []
    for index, row in enumerate(rows):
        ema_params, step = checkpoints[row.workdir]
        cfg_scale = ev.cfg_scale if row.cfg_scale is None else row.cfg_scale
        base = _sampler(model, row, num_classes, ev.cfg_scale)

        def sample(params, start, base=base):
            # Sample j: label j % classes, noise from fold_in(key, j); generated on the device that holds row j.
            idx = jax.lax.with_sharding_constraint(start + jnp.arange(bs), batch_sharding)
            noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), data_shape))(idx)
            return base(params, noise, (idx % num_classes).astype(jnp.int32))

        start_struct = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        params = jax.device_put(ema_params, replicated)
        chunk_dir, fields = chunk_dirs[row]
        paths = [os.path.join(chunk_dir, f"{_CHUNK_PREFIX}{c:05d}.npz") for c in range(plan.num_chunks)]
        done = _agree(np.array([os.path.exists(p) for p in paths]))
        logging.info("%s: %d of %d chunks already in %s", row.label, int(done.sum()), plan.num_chunks, chunk_dir)
        if jax.process_index() == 0:
            os.makedirs(chunk_dir, exist_ok=True)
            with open(os.path.join(chunk_dir, "fingerprint.json"), "w") as f:
                json.dump(fields, f, indent=1, default=str)

        sample_c = None
        chunks, computed, row_start = [], 0, time.perf_counter()
        for c in range(plan.num_chunks):
            if done[c]:
                chunks.append(_load_chunk(paths[c], len(plan.chunk(c))))
                continue
            if sample_c is None:  # compiled only when a chunk is missing
                sample_c = jax.jit(sample, in_shardings=(replicated, replicated), out_shardings=batch_sharding).lower(
                    params, start_struct).compile()
            parts, seconds = {"pool": [], "logits": [], "images": []}, np.zeros(3)
            for start in plan.batch_starts(c):
                t0 = time.perf_counter()
                samples = jax.block_until_ready(sample_c(params, jax.device_put(np.int32(start), replicated)))
                seconds[0] += time.perf_counter() - t0
                images, out, decode_s, inception_s = pipeline.images_and_features(samples)
                seconds[1:] += (decode_s, inception_s)
                parts["pool"].append(_to_host(out["pool"]))
                parts["logits"].append(_to_host(out["logits"]))
                if ev.export_npz or (c == 0 and sum(map(len, parts["images"])) < _PREVIEW):
                    parts["images"].append(_to_host(images))
            rows_c = plan.chunk(c)
            chunk = dict(pool=np.concatenate(parts["pool"]), logits=np.concatenate(parts["logits"]),
                         labels=(np.asarray(rows_c) % num_classes).astype(np.int32), seconds=seconds)
            if parts["images"]:
                images = np.concatenate(parts["images"])
                chunk["preview"] = images[:_PREVIEW] if c == 0 else images[:0]
                if ev.export_npz:
                    chunk["images"] = images
            if jax.process_index() == 0:
                _save_chunk(paths[c], chunk)
            chunk.pop("images", None)
            chunks.append(chunk)
            computed += 1
            elapsed = time.perf_counter() - row_start
            logging.info("%s: chunk %d/%d (%d samples) in %.1f s, %.1f images/s; row ETA %.0f s", row.label, c + 1,
                         plan.num_chunks, len(rows_c), seconds.sum(), len(rows_c) / max(seconds.sum(), 1e-9),
                         elapsed / computed * int(np.sum(~done[c + 1:])))

        pool = np.concatenate([ch["pool"] for ch in chunks])
        logits = np.concatenate([ch["logits"] for ch in chunks])
        seconds = np.sum([ch["seconds"] for ch in chunks], axis=0)
        is_mean, is_std = inception_score(logits, ev.inception_splits)
        entry = dict(model=row.name, sampler=row.sampler, steps=row.steps, nfe=row.nfe,
                     cfg_scale=None if row.sampler == "mean_flow" else cfg_scale,
                     fd=frechet_distance_to_features(pool, reference["mu"], reference["sigma"]),
                     inception_score=is_mean, inception_score_std=is_std, inception_splits=ev.inception_splits)
        if reference["features"] is not None:
            entry.update(precision_recall(reference["features"], pool, k=ev.nearest_k))
        else:
            entry.update(precision=None, recall=None)
        sampler_flops = flops_per_evaluation(row) * row.nfe
        entry.update(
            class_consistency=None, n_samples=plan.num_samples,
            seconds_per_image=float(seconds.sum()) / plan.num_samples,
            sampler_seconds_per_image=float(seconds[0]) / plan.num_samples,
            decode_seconds_per_image=float(seconds[1]) / plan.num_samples,
            inception_seconds_per_image=float(seconds[2]) / plan.num_samples,
            sampler_gflop_per_image=sampler_flops / 1e9,
            decode_gflop_per_image=pipeline.decode_flops / 1e9 if ev.vae_dir else 0.0,
            inception_gflop_per_image=pipeline.inception_flops / 1e9,
            feature_net="inception", feature_net_test_accuracy=None, reference=reference["source"],
            checkpoint_step=step, workdir=os.path.abspath(row.workdir), chunks=chunk_dir)

        preview = chunks[0].get("preview")
        if preview is None:
            with np.load(paths[0]) as z:
                preview = z["preview"]
        grid_path = os.path.join(workdir, "grids", f"{row.slug}.png")
        if jax.process_index() == 0:
            visualize.save_png(visualize.image_grid(preview.astype(np.float32) / 127.5 - 1.0,
                                                    max(1, int(np.sqrt(len(preview))))), grid_path)
            if row in exports and row not in exported:
                _export(exports[row], paths, plan, pipeline.image_shape)
                with open(os.path.join(chunk_dir, "export.json"), "w") as f:
                    json.dump(_file_id(exports[row]), f)
        entry["grid"] = grid_path
        entry["export_npz"] = os.path.abspath(exports[row]) if row in exports else None
        logging.info("%s: FID %.3f IS %.2f precision %s recall %s; %.4g s/image; GFLOP/image sampler %.4g, "
                     "decode %.4g, Inception %.4g", row.label, entry["fd"], is_mean, entry["precision"],
                     entry["recall"], entry["seconds_per_image"], entry["sampler_gflop_per_image"], entry["decode_gflop_per_image"],
                     entry["inception_gflop_per_image"])
        logging.info("eval row %d/%d done", index + 1, len(rows))
        entries.append(entry)

    if jax.process_index() == 0:
        write_results(entries, workdir)
    return entries


def _file_id(path: str) -> dict | None:
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path)} if os.path.exists(path) else None


def _export_record(chunk_dir: str) -> dict | None:
    """What the export of these chunks wrote (path and size), if it did."""
    try:
        with open(os.path.join(chunk_dir, "export.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _export(path: str, chunk_paths: list[str], plan: _Plan, image_shape: tuple[int, ...]) -> None:
    """The row's samples in the ADM evaluator's format: arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N]."""
    h, w, c = image_shape

    def blocks(key: str):
        for p in chunk_paths:
            with np.load(p) as z:
                block = z[key]
            yield np.repeat(block, 3, axis=-1) if key == "images" and c == 1 else block

    write_npz_streaming(path, {"arr_0": ((plan.num_samples, h, w, 3), np.uint8, blocks("images")),
                               "arr_1": ((plan.num_samples,), np.int64, blocks("labels"))})
    logging.info("wrote %d samples in the ADM evaluator format to %s", plan.num_samples, path)
