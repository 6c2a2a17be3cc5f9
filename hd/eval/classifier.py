"""The domain feature network for datasets without Inception weights (docs/method.md, evaluation): a small classifier
trained once on the training split and cached in the evaluation work directory. Its penultimate features
feed the Fréchet distance and precision/recall; its predictions give class-consistency."""

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

FEATURE_SIZE = 128


class Classifier(nn.Module):
    """A CNN for images ([B, H, W, C]) or an MLP for points ([B, D]); returns (features, logits)."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim == 4:
            for i, (features, stride) in enumerate(((32, 1), (64, 2), (128, 2))):
                x = nn.silu(nn.GroupNorm(8, name=f"norm{i}")(
                    nn.Conv(features, (3, 3), strides=stride, name=f"conv{i}")(x)))
            x = x.mean(axis=(1, 2))
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
    """Held-out examples: the test split for datasets, fresh draws for the 2-D toys."""
    source = load_source(_split_cfg(data_cfg, "test"))
    if source.num_examples is None:
        return source.sample(np.random.default_rng(seed), num_examples)
    n = min(num_examples, source.num_examples)
    return source.get(np.arange(n))


def train_classifier(data_cfg: ml_collections.ConfigDict, directory: str, *, num_steps: int, batch_size: int = 128,
                     seed: int = 0) -> tuple[Any, float]:
    """Train (or load the cached) classifier; returns (params, test accuracy)."""
    model = Classifier(data_cfg.num_classes)
    info_path = os.path.join(directory, "classifier.json")
    ckpt_path = os.path.abspath(os.path.join(directory, "classifier"))
    if os.path.exists(info_path):  # the cache is checked before the training split is read
        with open(info_path) as f:
            info = json.load(f)
        # Compared as JSON: the stored dict has lists where the config has tuples.
        if info["num_steps"] == num_steps and info["data"] == json.loads(json.dumps(data_cfg.to_dict())):
            return ocp.StandardCheckpointer().restore(ckpt_path), info["test_accuracy"]

    data = make_batch_iterator(_split_cfg(data_cfg, "train"), global_batch_size=batch_size, seed=seed)
    example = next(data)
    params = model.init(jax.random.PRNGKey(seed), example["x"][:1])["params"]

    optimizer = optax.adam(optax.cosine_decay_schedule(2e-3, num_steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            _, logits = model.apply({"params": p}, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    for i in range(num_steps):
        params, opt_state, loss = step(params, opt_state, next(data))
        if (i + 1) % max(num_steps // 5, 1) == 0:
            elapsed = time.perf_counter() - start
            logging.info("classifier step %d/%d: loss %.4f (%.0f s, ETA %.0f s)", i + 1, num_steps, float(loss),
                         elapsed, elapsed / (i + 1) * (num_steps - i - 1))
    reference = reference_data(data_cfg, 10_000)
    _, predictions = classify(params, data_cfg.num_classes, reference["x"])
    accuracy = float(np.mean(predictions == reference["y"]))

    os.makedirs(directory, exist_ok=True)
    # Every process trained the same classifier; host arrays are written once (by process 0) in orbax's
    # collective save, which all processes must enter.
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_path, jax.device_get(params), force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(info_path, "w") as f:
            json.dump({"num_steps": num_steps, "data": data_cfg.to_dict(), "test_accuracy": accuracy}, f, indent=2)
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
