"""The domain feature network for datasets without Inception weights (docs/method.md, evaluation): a small classifier
trained once on the training split and cached in the evaluation work directory. Its penultimate features
feed the Fréchet distance and precision/recall; its predictions give class-consistency.

The cache (DIRECTORY/classifier.json beside the orbax checkpoint DIRECTORY/classifier) is keyed by the data
config and the training recipe, both compared as JSON; any change trains a new classifier. The test accuracy
stored with it is the one every evaluation reports.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from hd.data import load_source, make_batch_iterator
from hd.files import replace_json

FEATURE_SIZE = 128
# Bumped whenever the architecture or the training recipe changes, so an older cache is never restored into
# (or reported for) a network it was not trained as.
VERSION = 2
# Datasets whose classes are unchanged by a left-right flip (clothes, shoes and bags); others get shifts only.
_MIRROR_SYMMETRIC = ("fashion_mnist",)
_SHIFT = 2  # random translation of up to this many pixels each way


class Classifier(nn.Module):
    """A CNN for images ([B, H, W, C]) or an MLP for points ([B, D]); returns (features, logits).

    Images: two stride-2 convolutions and one at 7x7, then the whole 7x7 map flattened into the feature layer.
    Keeping where things are matters for clothes (the earlier global-average-pooled CNN reached 0.79 test
    accuracy); starting at stride 2 keeps a training step cheap on a CPU (a first layer at full resolution made
    it about 8 times dearer). GroupNorm, not BatchNorm: no batch statistics to carry, and an image's features
    do not depend on the rest of its batch.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim == 4:
            for i, (features, stride) in enumerate(((32, 2), (64, 2), (64, 1))):
                x = nn.silu(nn.GroupNorm(8, name=f"norm{i}")(
                    nn.Conv(features, (3, 3), strides=stride, name=f"conv{i}")(x)))
            x = x.reshape(x.shape[0], -1)
        else:
            for i in range(3):
                x = nn.silu(nn.Dense(128, name=f"dense{i}")(x))
        features = nn.silu(nn.Dense(FEATURE_SIZE, name="penultimate")(x))
        return features, nn.Dense(self.num_classes, name="logits")(features)


def _split_cfg(data_cfg: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.split = split
    return cfg


def reference_data(data_cfg: ml_collections.ConfigDict, num_examples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Held-out examples: the whole test split, or a fixed random draw of `num_examples` of it (the same for
    every run: `seed` is not the run's seed); fresh draws for the 2-D toys. A draw, not the first N: a split's
    order can follow collection or class, and the reference must be a sample of the whole split."""
    source = load_source(_split_cfg(data_cfg, "test"))
    if source.num_examples is None:
        return source.sample(np.random.default_rng(seed), num_examples)
    if num_examples >= source.num_examples:
        return source.get(np.arange(source.num_examples))
    draw = np.random.default_rng(np.random.SeedSequence([seed, source.num_examples])).permutation(
        source.num_examples)[:num_examples]
    return source.get(np.sort(draw))  # sorted: sequential reads for sources not held in memory


def recipe(data_cfg: ml_collections.ConfigDict, *, num_steps: int, batch_size: int, seed: int) -> dict:
    """Everything besides the data config that defines the trained classifier (part of the cache key)."""
    return {"version": VERSION, "num_steps": num_steps, "batch_size": batch_size, "seed": seed,
            "optimizer": "adam", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
            "augment": {"shift": _SHIFT, "flip": data_cfg.name in _MIRROR_SYMMETRIC}}


def _augment(key: jax.Array, x: jax.Array, *, shift: int, flip: bool) -> jax.Array:
    """Random translations (edge-padded) and, when the classes allow it, left-right flips of a batch [B, H, W, C]."""
    b, h, w, c = x.shape
    k_flip, k_shift = jax.random.split(key)
    if flip:
        x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
    if shift:
        padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * shift + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    return x


def _read_cache(info_path: str, key: dict) -> dict | None:
    if not os.path.exists(info_path):
        return None
    with open(info_path) as f:
        info = json.load(f)
    # Compared as JSON: the stored dict has lists where the config has tuples.
    stored = {"data": info.get("data"), "recipe": info.get("recipe")}
    return info if stored == json.loads(json.dumps(key)) else None


def _fit(model: Classifier, data_cfg: ml_collections.ConfigDict, spec: dict) -> Any:
    """Trains the classifier on the training split as `spec` (see `recipe`) says; returns its parameters."""
    num_steps, seed = spec["num_steps"], spec["seed"]
    data = make_batch_iterator(_split_cfg(data_cfg, "train"), global_batch_size=spec["batch_size"], seed=seed)
    example = next(data)
    params = model.init(jax.random.PRNGKey(seed), example["x"][:1])["params"]
    # Short runs (tests) warm up for a tenth of their steps: the cosine needs steps left after the warm-up.
    warmup = min(spec["warmup_steps"], num_steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, spec["learning_rate"], warmup, num_steps)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    images = example["x"].ndim == 4
    augment = spec["augment"]

    @jax.jit
    def step(params, opt_state, batch, key):
        x = _augment(key, batch["x"], **augment) if images else batch["x"]

        def loss_fn(p):
            _, logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    base_key = jax.random.PRNGKey(seed + 1)
    start = time.perf_counter()
    for i in range(num_steps):
        params, opt_state, loss = step(params, opt_state, next(data), jax.random.fold_in(base_key, i))
        if (i + 1) % max(num_steps // 5, 1) == 0:
            elapsed = time.perf_counter() - start
            logging.info("classifier step %d/%d: loss %.4f (%.0f s, ETA %.0f s)", i + 1, num_steps, float(loss),
                         elapsed, elapsed / (i + 1) * (num_steps - i - 1))
    return params


def train_classifier(data_cfg: ml_collections.ConfigDict, directory: str, *, num_steps: int, batch_size: int = 128,
                     seed: int = 0) -> tuple[Any, float]:
    """Train (or load the cached) classifier; returns (params, test accuracy on the whole test split)."""
    model = Classifier(data_cfg.num_classes)
    info_path = os.path.join(directory, "classifier.json")
    ckpt_path = os.path.abspath(os.path.join(directory, "classifier"))
    spec = recipe(data_cfg, num_steps=num_steps, batch_size=batch_size, seed=seed)
    key = {"data": data_cfg.to_dict(), "recipe": spec}
    info = _read_cache(info_path, key)  # checked before the training split is read
    if info is not None:
        return ocp.StandardCheckpointer().restore(ckpt_path), info["test_accuracy"]

    start = time.perf_counter()
    params = _fit(model, data_cfg, spec)
    train_seconds = time.perf_counter() - start
    reference = reference_data(data_cfg, 10_000)
    _, predictions = classify(params, data_cfg.num_classes, reference["x"])
    accuracy = float(np.mean(predictions == reference["y"]))
    logging.info("classifier: test accuracy %.4f on %d examples, trained in %.0f s", accuracy, len(predictions),
                 train_seconds)

    os.makedirs(directory, exist_ok=True)
    # A new classifier replaces a stale cache only once it is trained; the old record goes first, so a crash
    # while saving leaves no record (the next run trains again) rather than a record beside other weights.
    # Every process trained the same classifier; host arrays are written once (by process 0) in orbax's
    # collective save, which all processes must enter.
    if jax.process_index() == 0 and os.path.exists(info_path):
        os.remove(info_path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_path, jax.device_get(params), force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        record = dict(key, test_accuracy=accuracy, test_examples=len(predictions), train_seconds=train_seconds)
        replace_json(info_path, record)
    return params, accuracy


def classify(params: Any, num_classes: int, x: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features [N, 128], predicted classes [N]) in batches."""
    apply = jax.jit(lambda p, v: Classifier(num_classes).apply({"params": p}, v))
    features, predictions = [], []
    for i in range(0, len(x), batch_size):
        f, logits = apply(params, jnp.asarray(x[i:i + batch_size]))
        features.append(np.asarray(f))
        predictions.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(features), np.concatenate(predictions)
