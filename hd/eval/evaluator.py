"""Sample from any stage's checkpoint and score the samples the same way for every row.

A row is one model at one sampler setting: the teacher with Euler or Heun at N steps, or a one-step
generator (sketch, refine) at k mean-flow steps. Every row uses the same noise, labels (balanced classes),
feature network and reference set, so rows compare. Results go to results.json and results.md; one sample
grid per row (one row of the grid per class) goes to grids/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from hd import flow, parallel, visualize
from hd.checkpoint import read_items
from hd.eval.classifier import classify, reference_data, train_classifier
from hd.eval.frechet import feature_statistics, frechet_distance
from hd.eval.precision_recall import precision_recall
from hd.models import average_velocity_apply, build_model, init_params, velocity_apply


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # e.g. "teacher", "sketch", "refine"
    workdir: str
    sampler: str  # euler | heun | mean_flow
    steps: int

    @property
    def nfe(self) -> int:
        return self.steps if self.sampler == "mean_flow" else flow.ode_nfe(self.steps, self.sampler)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.sampler}-{self.steps}"


def rows_from_config(config: ml_collections.ConfigDict) -> list[Row]:
    ev = config.eval
    rows = []
    if ev.teacher_workdir:
        rows += [Row("teacher", ev.teacher_workdir, "euler", n) for n in ev.teacher_euler_steps]
        rows += [Row("teacher", ev.teacher_workdir, "heun", n) for n in ev.teacher_heun_steps]
    for entry in filter(None, (s.strip() for s in ev.students.split(","))):
        if "=" not in entry:
            raise ValueError(f"config.eval.students entry {entry!r} is not NAME=WORKDIR")
        name, workdir = entry.split("=", 1)
        rows += [Row(name, workdir, "mean_flow", n) for n in ev.student_steps]
    if not rows:
        raise ValueError("nothing to evaluate: set config.eval.teacher_workdir and/or config.eval.students "
                         "(NAME=WORKDIR,...)")
    return rows


def _sampler(model, row: Row, num_classes: int, cfg_scale: float):
    if row.sampler == "mean_flow":
        apply = average_velocity_apply(model)
        return lambda params, noise, labels: flow.sample_mean_flow(
            lambda z, r, t, y: apply(params, z, r, t, y), noise, labels, num_steps=row.steps)
    apply = velocity_apply(model)
    return lambda params, noise, labels: flow.sample_ode(
        flow.guided_velocity(lambda z, t, y: apply(params, z, t, y), num_classes, cfg_scale), noise, labels,
        num_steps=row.steps, method=row.sampler)


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
            from hd.eval.inception import load_inception_params  # heavy; only when asked for
            self.variables = load_inception_params(ev.inception_weights, ev.inception_sha256 or None)
            self.accuracy = None
        else:
            raise ValueError(f"config.eval.feature_net={self.kind!r} is not 'classifier' or 'inception'")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.kind == "classifier":
            return classify(self.params, self.num_classes, x)
        from hd.eval.inception import inception_features
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
    rows = rows_from_config(config) if rows is None else rows
    reference = reference_data(config.data, ev.num_samples)
    data_shape = tuple(reference["x"].shape[1:])
    model = build_model(config.model, data_shape, config.data.num_classes)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), data_shape))
    # Read every checkpoint first: a missing or mismatched one fails before any sampling.
    params = {wd: read_items(wd, {"ema_params": abstract})[0]["ema_params"] for wd in {r.workdir for r in rows}}

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

        entry = dict(model=row.name, sampler=row.sampler, steps=row.steps, nfe=row.nfe, **scorer.score(samples),
                     n_samples=n, seconds_per_image=seconds / n, feature_net=scorer.features.kind,
                     feature_net_test_accuracy=scorer.features.accuracy, workdir=os.path.abspath(row.workdir))
        grid = visualize.points_image(samples) if len(data_shape) == 1 else visualize.image_grid(
            samples[grid_index], config.data.num_classes)
        grid_path = os.path.join(workdir, "grids", f"{row.name}_{row.sampler}_{row.steps}.png")
        if jax.process_index() == 0:
            visualize.save_png(grid, grid_path)
        entry["grid"] = grid_path
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
    header = "| model | sampler | steps | NFE | FD | precision | recall | class-consistency | ms/image |"
    lines = [header, "|" + "---|" * 9]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    for e in entries:
        lines.append(f"| {e['model']} | {e['sampler']} | {e['steps']} | {e['nfe']} | {e['fd']:.3f} | "
                     f"{fmt(e.get('precision'), '.3f')} | {fmt(e.get('recall'), '.3f')} | "
                     f"{fmt(e['class_consistency'], '.3f')} | {1e3 * e['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def write_results(entries: list[dict], workdir: str, name: str = "results") -> None:
    """NAME.json (every field) and NAME.md (the table, after a line naming the feature net) in `workdir`."""
    path = os.path.join(workdir, name)
    with open(path + ".json.tmp", "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(path + ".json.tmp", path + ".json")
    first = entries[0]
    note = (f"Features: {first['feature_net']}"
            + (f" (test accuracy {first['feature_net_test_accuracy']:.4f})" if first["feature_net_test_accuracy"]
               else "") + f"; {first['n_samples']} samples per row.\n\n")
    with open(path + ".md", "w") as f:
        f.write(note + results_table(entries) + "\n")
