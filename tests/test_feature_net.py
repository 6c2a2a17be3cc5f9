"""The evaluation's feature classifier (hd.eval.classifier): trained once and cached, the cache reused without
training, invalidated by any change of data config or recipe (a failed retraining leaves the old cache), the
reported accuracy the recorded one; and the reference set a fixed random draw of the test split.

The training here is a few steps (the real recipe is config.eval.classifier_steps; see the README for its accuracy)."""

from __future__ import annotations

import json
import os

import chex
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from hd.data import load_source
from hd.eval import classifier


@pytest.fixture(scope="module")
def data_cfg():
    return load_config("fashion_mnist", "eval_tiny").data


@pytest.fixture
def fits(monkeypatch):
    """Counts the trainings (classifier._fit calls)."""
    calls = []
    real_fit = classifier._fit

    def counted(*args, **kwargs):
        calls.append(args[2]["num_steps"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(classifier, "_fit", counted)
    return calls


def test_cache_is_reused_and_reports_the_recorded_accuracy(data_cfg, fits, tmp_path, monkeypatch):
    directory = str(tmp_path / "feature_net")
    params, accuracy = classifier.train_classifier(data_cfg, directory, num_steps=3, batch_size=32)
    assert fits == [3]
    info_path = os.path.join(directory, "classifier.json")
    with open(info_path) as f:
        info = json.load(f)
    assert info["test_accuracy"] == accuracy and info["test_examples"] == 10_000
    assert info["recipe"] == classifier.recipe(data_cfg, num_steps=3, batch_size=32, seed=0)
    assert info["recipe"]["augment"] == {"shift": 2, "flip": True}
    # The recorded accuracy is the stored network's accuracy on the whole test split.
    test = load_source(classifier._split_cfg(data_cfg, "test"))
    test_set = test.get(np.arange(test.num_examples))
    _, predictions = classifier.classify(params, data_cfg.num_classes, test_set["x"])
    assert np.mean(predictions == test_set["y"]) == pytest.approx(accuracy)

    stamp = os.path.getmtime(info_path)
    again, reported = classifier.train_classifier(data_cfg, directory, num_steps=3, batch_size=32)
    assert fits == [3], "the second call must not train"
    assert reported == accuracy and os.path.getmtime(info_path) == stamp
    chex.assert_trees_all_equal(jax_to_numpy(again), jax_to_numpy(params))

    # What is reported is what the cache records (not recomputed from the network).
    info["test_accuracy"] = 0.125
    with open(info_path, "w") as f:
        json.dump(info, f)
    assert classifier.train_classifier(data_cfg, directory, num_steps=3, batch_size=32)[1] == 0.125
    assert fits == [3]


def test_changed_config_invalidates_the_cache(data_cfg, fits, tmp_path, monkeypatch):
    directory = str(tmp_path / "feature_net")
    classifier.train_classifier(data_cfg, directory, num_steps=2, batch_size=16)
    classifier.train_classifier(data_cfg, directory, num_steps=2, batch_size=16)
    assert fits == [2]
    info_path = os.path.join(directory, "classifier.json")
    with open(info_path) as f:
        before = f.read()

    # Each change below must train again: a training that fails shows it tried, and leaves the cache as it was.
    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(classifier, "_fit", broken)
    other_data = ml_collections.ConfigDict(data_cfg.to_dict())
    other_data.split = "train[:50%]"
    changes = [dict(data_cfg=data_cfg, num_steps=3, batch_size=16), dict(data_cfg=data_cfg, num_steps=2, batch_size=8),
               dict(data_cfg=other_data, num_steps=2, batch_size=16)]
    for change in changes:
        with pytest.raises(RuntimeError, match="killed mid-training"):
            classifier.train_classifier(change.pop("data_cfg"), directory, **change)
    with monkeypatch.context() as patch:
        patch.setattr(classifier, "VERSION", classifier.VERSION + 1)  # another architecture or recipe
        with pytest.raises(RuntimeError, match="killed mid-training"):
            classifier.train_classifier(data_cfg, directory, num_steps=2, batch_size=16)
    with open(info_path) as f:
        assert f.read() == before
    classifier.train_classifier(data_cfg, directory, num_steps=2, batch_size=16)  # still the cache: no training


def test_reference_is_a_fixed_random_draw_of_the_test_split(data_cfg):
    test = load_source(classifier._split_cfg(data_cfg, "test"))
    first = classifier.reference_data(data_cfg, 500)
    chex.assert_shape(first["x"], (500, 28, 28, 1))
    np.testing.assert_array_equal(classifier.reference_data(data_cfg, 500)["x"], first["x"])  # the same every run
    assert not np.array_equal(first["x"], test.get(np.arange(500))["x"]), "the first N images, not a draw"
    assert np.unique(first["y"]).size == data_cfg.num_classes
    # Every drawn image is a test image, none twice.
    whole = classifier.reference_data(data_cfg, 10**6)  # more than the split: the whole split, in order
    np.testing.assert_array_equal(whole["y"], test.get(np.arange(test.num_examples))["y"])
    flat = whole["x"].reshape(len(whole["x"]), -1)
    index = {row.tobytes(): i for i, row in enumerate(flat)}
    drawn = [index.get(row.tobytes()) for row in first["x"].reshape(500, -1)]
    assert None not in drawn and len(set(drawn)) == 500 and drawn == sorted(drawn)


def jax_to_numpy(tree):
    import jax
    return jax.tree.map(np.asarray, tree)
