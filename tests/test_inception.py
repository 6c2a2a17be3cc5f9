"""FID InceptionV3: architecture, weight files (both formats, checksums), and preprocessing. Random weights only."""

import pickle
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

from hd.eval import (
    file_sha256,
    inception_features,
    init_inception_params,
    load_inception_params,
    preprocess_for_inception,
    save_inception_params,
    torch_state_dict_to_variables,
)
from hd.eval.convert_inception import main as convert_main


@pytest.fixture(scope="module")
def variables():
    # Random BN statistics too, so a mix-up of scale/bias/mean/var in a round trip cannot go unnoticed.
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(init_inception_params(0), sep="/")
    flat = {k: (v if k.endswith("kernel") else rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
            for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def _assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def _to_torch_style(variables):
    # The inverse mapping, written independently of the converter: flax → pytorch-fid state dict names/layouts.
    out = {}
    for path, value in traverse_util.flatten_dict(variables["params"]).items():
        *module, leaf = path
        name = ".".join(module)
        if leaf == "kernel" and module == ["fc"]:
            out["fc.weight"] = value.T
        elif leaf == "kernel":
            out[f"{name}.weight"] = np.transpose(value, (3, 2, 0, 1))  # HWIO → OIHW
        else:
            out[f"{name}.{'weight' if leaf == 'scale' else 'bias'}"] = value
    for path, value in traverse_util.flatten_dict(variables["batch_stats"]).items():
        name = ".".join(path[:-1])
        out[f"{name}.running_{path[-1]}"] = value
        out[f"{name}.num_batches_tracked"] = np.array(0)
    return out


def test_parameter_count_matches_torchvision(variables):
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head (3,326,696) and 1000 classes;
    # the FID net drops the aux head and has 1008 classes: 27,161,264 − 3,326,696 + 8 × 2048 + 8.
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    assert variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)


def test_forward_shapes(variables):
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = inception_features(variables, images)  # resized to 299×299 inside
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert np.all(np.isfinite(out["pool"])) and np.all(np.isfinite(out["logits"]))


def test_pickle_round_trip(variables, tmp_path):
    path = tmp_path / "inception.pkl"
    digest = save_inception_params(variables, path)
    assert digest == file_sha256(path)
    _assert_trees_equal(load_inception_params(path, digest.upper()), variables)


def test_torch_state_dict_round_trip(variables, tmp_path):
    state = _to_torch_style(variables)
    _assert_trees_equal(torch_state_dict_to_variables(state), variables)
    # the loader also takes such a flat dict pickled directly
    path = tmp_path / "flat.pkl"
    path.write_bytes(pickle.dumps(state))
    _assert_trees_equal(load_inception_params(path, file_sha256(path)), variables)


def test_wrong_weights_are_rejected(variables, tmp_path):
    state = _to_torch_style(variables)
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:, :10]
    with pytest.raises(ValueError, match="wrong shapes"):
        torch_state_dict_to_variables(state)
    with pytest.raises(ValueError, match="unexpected entry"):
        torch_state_dict_to_variables({"conv1.weight": np.zeros((1, 1, 1, 1))})


def test_checksum_mismatch(variables, tmp_path):
    path = tmp_path / "inception.pkl"
    actual = save_inception_params(variables, path)
    expected = "0" * 64
    with pytest.raises(ValueError) as err:
        load_inception_params(path, expected)
    assert actual in str(err.value) and expected in str(err.value) and str(path) in str(err.value)
    with pytest.warns(UserWarning, match=actual):
        load_inception_params(path, None)


def test_converter_without_torch_explains(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail even where torch is installed
    with pytest.raises(SystemExit) as err:
        convert_main(["--pt", str(tmp_path / "x.pth"), "--out", str(tmp_path / "y.pkl")])
    assert "PyTorch" in str(err.value.code)


def test_converter_end_to_end_with_stand_in_torch(variables, monkeypatch, tmp_path, capsys):
    # Everything but torch.load is ours; a stand-in torch module returns the fake state dict as "tensors".
    class Tensor:
        def __init__(self, value):
            self.value = value

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.value

    state = {k: Tensor(v) for k, v in _to_torch_style(variables).items()}
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=lambda *args, **kwargs: state))
    pt, out = tmp_path / "pt_inception.pth", tmp_path / "inception.pkl"
    pt.write_bytes(b"stand-in")
    convert_main(["--pt", str(pt), "--out", str(out)])
    assert file_sha256(out) in capsys.readouterr().out
    _assert_trees_equal(load_inception_params(out, file_sha256(out)), variables)


def _half_pixel_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    # Reference for F.interpolate(bilinear, align_corners=False): source coordinate (i + 0.5)·in/out − 0.5,
    # clamped at the borders. Separable: apply along H, then W.
    def along(a, axis):
        n = a.shape[axis]
        src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (src - lo).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
        return np.take(a, lo, axis) * (1 - w) + np.take(a, hi, axis) * w

    return along(along(x, 1), 2)


def test_preprocess_uint8_rgb_and_resize_convention():
    images = np.random.default_rng(2).integers(0, 256, (2, 28, 36, 3), dtype=np.uint8)
    x = np.asarray(preprocess_for_inception(images))
    assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    expected = _half_pixel_bilinear(images.astype(np.float64), 299) / 127.5 - 1
    np.testing.assert_allclose(x, expected, atol=1e-5)


def test_preprocess_at_299_is_only_scaling():
    images = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(preprocess_for_inception(images)), images / 127.5 - 1, atol=1e-6)
    assert np.asarray(preprocess_for_inception(np.zeros((1, 299, 299, 3), np.uint8))).min() == -1
    assert np.asarray(preprocess_for_inception(np.full((1, 299, 299, 3), 255, np.uint8))).max() == 1


def test_preprocess_grayscale_and_float():
    gray = np.random.default_rng(4).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    x = np.asarray(preprocess_for_inception(gray))
    assert x.shape == (3, 299, 299, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # float [-1, 1] samples are quantised like a saved PNG, so they match their uint8 version exactly
    as_float = gray.astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(np.asarray(preprocess_for_inception(as_float)), x)
    with pytest.raises(ValueError):
        preprocess_for_inception(np.zeros((2, 28, 28), np.uint8))


def test_preprocess_matches_tf_image_resize():
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(5).integers(0, 256, (1, 40, 24, 3), dtype=np.uint8)
    expected = tf.image.resize(images.astype(np.float32), (299, 299), method="bilinear", antialias=False)
    np.testing.assert_allclose(np.asarray(preprocess_for_inception(images)), expected.numpy() / 127.5 - 1, atol=1e-5)
