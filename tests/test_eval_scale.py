"""The paper-scale evaluation on tiny sizes: the Inception Score against a hand computation, the uint8 rule,
the exact low-rank FID, the streaming ADM .npz writer, bad settings refused before anything runs, and a chunked
latent evaluation (tiny DiT teacher, random tiny SD-VAE, random-weight Inception) that is interrupted after a
chunk and resumed to the identical FID / IS / precision / recall, its export scoring the same."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from hd.eval.frechet import feature_statistics, frechet_distance, frechet_distance_to_features
from hd.eval.inception import quantize_to_uint8
from hd.eval.inception_score import inception_score

TINY_VAE = {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "scaling_factor": 0.5}
LATENT = (8, 8, 4)  # decodes to 16×16×3
CLASSES = 10


def test_inception_score_hand_computed():
    # Split A: p(y|x) = (1/2, 1/4, 1/4) and (1/4, 1/2, 1/4); marginal (3/8, 3/8, 1/4); each KL is
    # 1/2 ln(4/3) + 1/4 ln(2/3), so IS_A = (4/3)^(1/2) (2/3)^(1/4). Split B: two equal rows, KL 0, IS_B = 1.
    p = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    logits = np.log(p) + np.array([[3.0], [-1.0], [0.5], [7.0]])  # softmax ignores a per-row offset
    is_a = (4 / 3) ** 0.5 * (2 / 3) ** 0.25
    mean, std = inception_score(logits, num_splits=2)
    assert mean == pytest.approx((is_a + 1) / 2, rel=1e-12)
    assert std == pytest.approx((is_a - 1) / 2, rel=1e-12)
    # One split over all four: marginal (0.2875, 0.3375, 0.375).
    marginal = p.mean(axis=0)
    expected = np.exp(np.mean(np.sum(p * np.log(p / marginal), axis=1)))
    assert inception_score(logits, num_splits=1) == pytest.approx((expected, 0.0), rel=1e-12)


def test_inception_score_confident_balanced_is_number_of_classes():
    logits = 60.0 * np.tile(np.eye(1008)[:5], (4, 1))  # 5 classes, 4 samples each, all certain
    assert inception_score(logits, num_splits=4)[0] == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="equal parts"):
        inception_score(logits, num_splits=3)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.full((2, 3), np.nan), num_splits=1)


def test_quantize_rule():
    x = jnp.array([-2.0, -1.0, 2 / 255 - 1, 0.0, 1 / 255, 1.0, 3.0])
    # (x + 1) * 127.5 = -127.5, 0, 1, 127.5 (ties to even: 128), 128, 255, 510 -> clipped and rounded
    np.testing.assert_array_equal(np.asarray(quantize_to_uint8(x)), [0, 0, 1, 128, 128, 255, 255])
    assert quantize_to_uint8(x).dtype == jnp.uint8


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than feature dimensions
def test_frechet_distance_to_features_matches_covariance_form(n):
    rng = np.random.default_rng(n)
    d = 16
    mu, sigma = feature_statistics(rng.normal(size=(100, d)) @ rng.normal(size=(d, d)))
    features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
    # The eigen form of Tr (S1 S2)^{1/2} (independent of both code paths).
    w, v = np.linalg.eigh(sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m2, s2 = feature_statistics(features)
    inner = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    expected = np.sum((mu - m2) ** 2) + np.trace(sigma) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance_to_features(features, mu, sigma) == pytest.approx(expected, rel=1e-7)
    if n > d:
        assert frechet_distance_to_features(features, mu, sigma) == frechet_distance(m2, s2, mu, sigma)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance_to_features(features[:5], mu, -np.eye(d))


def test_streaming_npz_round_trip(tmp_path):
    from hd.eval.evaluator import write_npz_streaming

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    path = str(tmp_path / "samples.npz")
    write_npz_streaming(path, {"arr_0": (images.shape, np.uint8, [images[:3], images[3:]]),
                               "arr_1": (labels.shape, np.int64, [labels])})
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    with pytest.raises(ValueError, match="declared"):
        write_npz_streaming(str(tmp_path / "short.npz"), {"arr_0": (images.shape, np.uint8, [images[:3]])})
    assert not os.path.exists(tmp_path / "short.npz") and os.listdir(tmp_path) == ["samples.npz"]


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """A tiny teacher checkpoint on 8×8×4 latents, a random tiny VAE folder, random Inception weights and an
    ADM-style reference batch (mu, sigma, arr_0)."""
    from hd.checkpoint import Checkpointer
    from hd.eval.inception import init_inception_params, save_inception_params
    from hd.models import build_model, init_params
    from hd.models.vae import save_vae, vae_from_config
    from hd.train.state import TrainState

    root = tmp_path_factory.mktemp("eval_scale")
    save_vae(vae_from_config(TINY_VAE, jax.random.PRNGKey(0)), str(root / "vae"))
    sha = save_inception_params(init_inception_params(0), root / "inception.pkl")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 2048)) * 0.3
    np.savez(root / "reference.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False),
             arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))

    config = _config(root, sha)
    model = build_model(config.model, LATENT, CLASSES)
    params = init_params(model, jax.random.PRNGKey(1), LATENT)
    # Perturb every leaf (the zero-initialised output layer included) so samples depend on the network.
    leaves, treedef = jax.tree.flatten(params)
    params = jax.tree.unflatten(treedef, [np.asarray(l) + 0.05 * rng.standard_normal(l.shape).astype(np.float32)
                                          for l in leaves])
    state = TrainState.create(params, optax.sgd(1e-3)).replace(step=jnp.array(3, jnp.int32))
    checkpointer = Checkpointer(str(root / "teacher"), keep=1)
    checkpointer.save(3, state, {"step": 3})
    checkpointer.close()
    return root, sha


def _config(root, sha, extra: dict | None = None, **eval_overrides):
    overrides = {"data.latent_scale": TINY_VAE["scaling_factor"], "model.size": "tiny", "model.patch_size": 2,
                 "model.dtype": "float32", "model.scan_blocks": False, "model.remat": False,
                 "data.example_shape": LATENT, "data.num_classes": CLASSES,
                 "eval.teacher_workdir": str(root / "teacher"), "eval.teacher_euler_steps": (2,),
                 "eval.guidance_scales": (1.5,), "eval.num_samples": 12, "eval.batch_size": 4,
                 "eval.chunk_size": 4, "eval.inception_splits": 4, "eval.vae_dir": str(root / "vae"),
                 "eval.inception_weights": str(root / "inception.pkl"), "eval.inception_sha256": sha,
                 "eval.reference_npz": str(root / "reference.npz")}
    overrides.update({f"eval.{k}": v for k, v in eval_overrides.items()}, **(extra or {}))
    return load_config("imagenet256", "eval", overrides)


def test_bad_settings_fail_before_anything_runs(latent_setup, tmp_path):
    from hd.eval.evaluator import check_inception_eval, evaluate_inception

    root, sha = latent_setup
    with pytest.raises(ValueError, match="chunk_size=6 must be a multiple"):
        check_inception_eval(_config(root, sha, chunk_size=6), 1)
    with pytest.raises(ValueError, match="inception_splits"):
        check_inception_eval(_config(root, sha, inception_splits=5), 1)
    with pytest.raises(ValueError, match="not images"):
        check_inception_eval(_config(root, sha, vae_dir=""), 1)
    with pytest.raises(ValueError, match="lacks config.json"):
        check_inception_eval(_config(root, sha, vae_dir=str(tmp_path)), 1)
    with pytest.raises(ValueError, match="scaling_factor 0.5"):
        evaluate_inception(_config(root, sha, {"data.latent_scale": 0.18215}), str(tmp_path / "eval"))
    existing = tmp_path / "samples.npz"
    existing.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="never overwritten"):
        evaluate_inception(_config(root, sha, export_npz=str(existing)), str(tmp_path / "eval"))
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "eval").exists()  # nothing written


def test_interrupted_chunked_evaluation_resumes_to_the_identical_result(latent_setup, tmp_path, monkeypatch):
    import hd.eval.evaluator as evaluator
    from hd.eval.inception import inception_features, load_inception_params
    from hd.models.vae import load_vae

    root, sha = latent_setup
    whole = evaluator.evaluate_inception(_config(root, sha, export_npz=str(tmp_path / "whole.npz")),
                                         str(tmp_path / "whole"))

    # Same evaluation in another directory, stopped by an error right after its first chunk is saved (a kill
    # between chunks; a kill inside _save_chunk leaves only a temporary file, which a rerun ignores).
    saves, real_save = [], evaluator._save_chunk

    def save_then_die(path, arrays):
        real_save(path, arrays)
        saves.append(path)
        raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(evaluator, "_save_chunk", save_then_die)
    config = _config(root, sha, export_npz=str(tmp_path / "resumed.npz"))
    with pytest.raises(KeyboardInterrupt):
        evaluator.evaluate_inception(config, str(tmp_path / "resumed"))
    chunk_dir = os.path.dirname(saves[0])
    open(os.path.join(chunk_dir, "chunk_00001.npz.tmp-999"), "wb").write(b"half a file")
    monkeypatch.setattr(evaluator, "_save_chunk", lambda p, a: (saves.append(p), real_save(p, a)))
    resumed = evaluator.evaluate_inception(config, str(tmp_path / "resumed"))

    # The resume computed only chunks 1 and 2 (of 4 samples each) and ends with the same numbers.
    assert [os.path.basename(p) for p in saves] == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    assert len(whole) == len(resumed) == 1
    (w,), (r,) = whole, resumed
    for key in ("fd", "inception_score", "inception_score_std", "precision", "recall"):
        assert w[key] == r[key], key
    assert np.isfinite(w["fd"]) and w["fd"] > 0 and 1.0 <= w["inception_score"] <= 1008
    assert w["nfe"] == 2 and w["cfg_scale"] == 1.5 and w["n_samples"] == 12
    assert w["sampler_gflop_per_image"] > 0 and w["decode_gflop_per_image"] > 0
    assert w["inception_gflop_per_image"] == pytest.approx(11.5, rel=0.1)  # ~5.7 G multiply-adds at 299×299
    assert os.path.exists(w["grid"])
    # A rerun of the finished command recomputes nothing and keeps the export it wrote.
    again = evaluator.evaluate_inception(config, str(tmp_path / "resumed"))
    assert len(saves) == 3 and again[0]["fd"] == r["fd"] and again[0]["export_npz"] == r["export_npz"]

    # The exports are the ADM format and identical; scored independently they give the same FID and IS.
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        images, labels = a["arr_0"], a["arr_1"]
        np.testing.assert_array_equal(images, b["arr_0"])
        np.testing.assert_array_equal(labels, b["arr_1"])
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(12) % CLASSES)
    variables = load_inception_params(root / "inception.pkl", sha)
    out = [inception_features(variables, images[i:i + 4]) for i in range(0, 12, 4)]
    pool = np.concatenate([np.asarray(o["pool"]) for o in out])
    logits = np.concatenate([np.asarray(o["logits"]) for o in out])
    with np.load(root / "reference.npz") as ref:
        fd = frechet_distance_to_features(pool, ref["mu"], ref["sigma"])
    assert fd == pytest.approx(w["fd"], rel=1e-5)
    assert inception_score(logits, 4)[0] == pytest.approx(w["inception_score"], rel=1e-5)

    # Sample 0 by hand: noise from fold_in(PRNGKey(seed + 777), 0), label 0, Euler 2 steps with CFG 1.5,
    # decode latents / scaling_factor, quantise.
    from hd import flow
    from hd.checkpoint import read_items
    from hd.models import build_model, init_params, velocity_apply

    model = build_model(config.model, LATENT, CLASSES)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), LATENT))
    params = read_items(str(root / "teacher"), {"ema_params": abstract})[0]["ema_params"]
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(config.seed + 777), 0), LATENT)[None]
    apply = velocity_apply(model)
    latents = flow.sample_ode(flow.guided_velocity(lambda z, t, y: apply(params, z, t, y), CLASSES, 1.5),
                              noise, jnp.zeros((1,), jnp.int32), num_steps=2)
    vae = load_vae(str(root / "vae"))
    by_hand = np.asarray(quantize_to_uint8(vae.decode(latents / vae.scaling_factor)))[0]
    assert np.max(np.abs(by_hand.astype(int) - images[0].astype(int))) <= 1  # batch-size rounding at most


def test_evaluation_step_of_the_compile_check_is_the_evaluators(latent_setup):
    """hd.compile_check --target=eval compiles evaluation_step: decode + uint8 + Inception in one function. It
    computes what the evaluator's two programs compute, and its FLOPs are their sum."""
    from hd.costs import lowered_cost
    from hd.eval.evaluator import decode_to_uint8, evaluation_step
    from hd.eval.inception import abstract_inception_variables, inception_features, load_inception_params
    from hd.models.vae import abstract_params, load_vae

    root, sha = latent_setup
    vae = load_vae(str(root / "vae"))
    variables = load_inception_params(root / "inception.pkl", sha)
    latents = jax.random.normal(jax.random.PRNGKey(5), (2, *LATENT)) * vae.scaling_factor
    step = evaluation_step(vae.decode_fn, vae.scaling_factor)
    fused = jax.jit(step)(vae.params, variables, latents)
    images = jax.jit(decode_to_uint8(vae.decode_fn, vae.scaling_factor))(vae.params, latents)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(quantize_to_uint8(vae.decode(latents / 0.5))))
    apart = inception_features(variables, images)
    for key, width in (("pool", 2048), ("logits", 1008)):
        assert fused[key].shape == (2, width)
        np.testing.assert_allclose(np.asarray(fused[key]), np.asarray(apart[key]), rtol=1e-5, atol=1e-5)

    abstract = (abstract_params(vae.module), abstract_inception_variables(),
                jax.ShapeDtypeStruct(latents.shape, jnp.float32))
    total = lowered_cost(step, abstract)["flops"]
    decode = lowered_cost(decode_to_uint8(vae.decode_fn, 0.5), (abstract[0], abstract[2]))["flops"]
    inception = lowered_cost(inception_features, (abstract[1], jax.ShapeDtypeStruct(images.shape, jnp.uint8)))["flops"]
    assert decode > 0 and total == pytest.approx(decode + inception, rel=1e-3)


def test_compile_check_eval_target_checks_its_flags_before_libtpu():
    """`--target=eval` reaches compile_vae_decode(inception=True); bad sizes fail with exit status 2 before
    anything is lowered. (Compiling decode + Inception for a TPU takes minutes of CPU: not run here.)"""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "hd.compile_check", "--target=eval", "--topology=v5e:2x2",
                           "--vae_batch_per_chip=0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "--vae_batch_per_chip=0 must be at least 1" in proc.stderr, proc.stderr[-3000:]
