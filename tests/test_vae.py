"""The Flax SD-VAE (hd.models.vae) against diffusers' AutoencoderKL, without torch: tests/fixtures/vae_tiny holds
a tiny diffusers AutoencoderKL with perturbed random weights and its PyTorch outputs (written by
`python -m hd.tools.make_fixtures --only=vae`)."""

from __future__ import annotations

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from hd.models import vae as vae_lib

FIXTURE = REPO / "tests" / "fixtures" / "vae_tiny"
# Counted here with diffusers 0.42.1: AutoencoderKL(**SD_VAE_CONFIG) has 248 state-dict entries holding 83,653,863
# numbers, the size of the released sd-vae-ft-ema / sd-vae-ft-mse.
SD_VAE_KEYS, SD_VAE_PARAMS = 248, 83_653_863


@pytest.fixture(autouse=True)
def float32_precision():
    """Full float32 convolutions and matmuls on any backend (GPUs default to TF32, ~1e-3 off the reference)."""
    with jax.default_matmul_precision("highest"):
        yield


def relative_error(actual, reference) -> float:
    reference = np.asarray(reference)
    return float(np.abs(np.asarray(actual, np.float64) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def fixture_vae() -> vae_lib.VAE:
    return vae_lib.load_vae(str(FIXTURE))


@pytest.fixture(scope="module")
def io() -> dict:
    return dict(np.load(FIXTURE / "io.npz"))


def write_folder(folder, state_dict: dict, config: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(folder / vae_lib.WEIGHTS_NAME))
    if config is None:
        shutil.copy(FIXTURE / vae_lib.CONFIG_NAME, folder / vae_lib.CONFIG_NAME)
    else:
        (folder / vae_lib.CONFIG_NAME).write_text(json.dumps(config))
    return str(folder)


def test_encoder_and_decoder_match_diffusers(fixture_vae, io):
    """Posterior mean and std of the encoder, and the decoder's images, within 1e-4 of the output scale."""
    assert fixture_vae.scaling_factor == pytest.approx(0.18215)
    mean, std = fixture_vae.encode(io["images"])
    decoded = fixture_vae.decode(io["latents"])
    chex.assert_shape([mean, std], io["mean"].shape)
    chex.assert_shape(decoded, io["decoded"].shape)
    # The references are far from trivial: std is not exp(0) everywhere and the images are O(1).
    assert np.ptp(io["std"]) > 0.5 and np.abs(io["decoded"]).max() > 1.0
    for name, actual in (("mean", mean), ("std", std), ("decoded", decoded)):
        assert relative_error(actual, io[name]) < 1e-4, name


def test_pure_forms_jit_with_explicit_params(fixture_vae, io):
    decoded = jax.jit(fixture_vae.decode_fn)(fixture_vae.params, io["latents"])
    mean, _ = jax.jit(fixture_vae.encode_fn)(fixture_vae.params, io["images"])
    assert relative_error(decoded, io["decoded"]) < 1e-4 and relative_error(mean, io["mean"]) < 1e-4


def test_bf16_decode_is_close_to_float32(io):
    vae = vae_lib.load_vae(str(FIXTURE), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(vae.params)} == {jnp.dtype(jnp.float32)}  # parameters stay float32
    decoded = vae.decode(io["latents"])
    assert decoded.dtype == jnp.float32
    error = relative_error(decoded, io["decoded"])
    assert 1e-5 < error < 0.05  # bfloat16 rounding, not float32 and not garbage


def test_real_config_shapes_and_parameter_count():
    """SD-VAE at 256x256: latents 32x32x4, images back to 256x256x3; its diffusers key list and size."""
    module = vae_lib.AutoencoderKL.from_config(vae_lib.SD_VAE_CONFIG)
    params = vae_lib.abstract_params(module)
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    mean, std = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method="encode"), params, images)
    assert mean.shape == std.shape == (2, 32, 32, 4)
    latents = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    decoded = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method="decode"), params, latents)
    assert (decoded.shape, decoded.dtype) == ((2, 256, 256, 3), jnp.float32)

    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    keys = vae_lib.diffusers_shapes(module)
    assert len(keys) == SD_VAE_KEYS
    assert count == sum(int(np.prod(shape)) for shape, _ in keys.values()) == SD_VAE_PARAMS
    assert keys["encoder.mid_block.attentions.0.to_q.weight"][0] == (512, 512)
    assert keys["decoder.up_blocks.3.resnets.2.conv2.weight"][0] == (128, 128, 3, 3)
    assert keys["decoder.up_blocks.0.upsamplers.0.conv.weight"][0] == (512, 512, 3, 3)
    assert keys["encoder.conv_out.weight"][0] == (8, 512, 3, 3) and keys["quant_conv.weight"][0] == (8, 8, 1, 1)


def test_save_and_load_round_trip(fixture_vae, tmp_path):
    vae_lib.save_vae(fixture_vae, str(tmp_path / "vae"))
    again = vae_lib.load_vae(str(tmp_path / "vae"))
    chex.assert_trees_all_equal(again.params, fixture_vae.params)
    assert again.config == fixture_vae.config and again.scaling_factor == fixture_vae.scaling_factor
    # The file is the diffusers layout: the same keys and arrays as the file diffusers wrote.
    written = load_file(str(tmp_path / "vae" / vae_lib.WEIGHTS_NAME))
    original = load_file(str(FIXTURE / vae_lib.WEIGHTS_NAME))
    assert written.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    before = (tmp_path / "vae" / vae_lib.WEIGHTS_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="new folder"):
        vae_lib.save_vae(fixture_vae, str(tmp_path / "vae"))
    assert (tmp_path / "vae" / vae_lib.WEIGHTS_NAME).read_bytes() == before


def test_legacy_attention_names_and_conv_shapes_load_the_same(fixture_vae, tmp_path):
    """Older released files name the attention query/key/value/proj_attn, some with 1x1-conv shapes."""
    state = load_file(str(FIXTURE / vae_lib.WEIGHTS_NAME))
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in state.items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[..., None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert sum(".query." in k for k in legacy) == 4 and legacy["encoder.mid_block.attentions.0.key.weight"].ndim == 4
    loaded = vae_lib.load_vae(write_folder(tmp_path / "legacy", legacy))
    chex.assert_trees_all_equal(loaded.params, fixture_vae.params)


def test_bad_weights_are_named_before_anything_is_built(tmp_path):
    state = load_file(str(FIXTURE / vae_lib.WEIGHTS_NAME))
    missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"}
    with pytest.raises(ValueError, match=r"missing key 'decoder.up_blocks.1.resnets.0.conv_shortcut.weight' "
                                         r"\(expected shape \(16, 32, 1, 1\)\)"):
        vae_lib.load_vae(write_folder(tmp_path / "missing", missing))

    misshaped = dict(state, **{"encoder.conv_in.weight": np.zeros((16, 3, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"'encoder.conv_in.weight' has shape \(16, 3, 1, 1\), but this config "
                                         r"expects \(16, 3, 3, 3\)"):
        vae_lib.load_vae(write_folder(tmp_path / "misshaped", misshaped))

    extra = dict(state, **{"encoder.extra.weight": np.zeros(2, np.float32), "lpips.w": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"2 unexpected key\(s\).*'encoder.extra.weight', 'lpips.w'"):
        vae_lib.load_vae(write_folder(tmp_path / "extra", extra))

    # Weights of another config: the first key whose shape differs is named.
    config = json.loads((FIXTURE / vae_lib.CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match=r"has shape .* but this config expects"):
        vae_lib.load_vae(write_folder(tmp_path / "other", state, {**config, "block_out_channels": [16, 64]}))


def test_sha256_is_checked(tmp_path):
    from hd.eval.inception import file_sha256

    actual = file_sha256(FIXTURE / vae_lib.WEIGHTS_NAME)
    vae_lib.load_vae(str(FIXTURE), sha256=actual.upper())
    with pytest.raises(ValueError, match=f"has sha256 {actual}, but {'0' * 64} was expected"):
        vae_lib.load_vae(str(FIXTURE), sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="config.json"):
        vae_lib.load_vae(str(tmp_path))


def test_configs_this_port_cannot_build_are_refused():
    base = json.loads((FIXTURE / vae_lib.CONFIG_NAME).read_text())
    for update, words in [({"norm_num_groups": 12}, "must divide"),
                          ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "UpDecoderBlock2D"),
                          ({"act_fn": "gelu"}, "silu"), ({"_class_name": "VQModel"}, "AutoencoderKL")]:
        with pytest.raises(ValueError, match=words):
            vae_lib.AutoencoderKL.from_config({**base, **update})
    with pytest.raises(ValueError, match="dtype"):
        vae_lib.AutoencoderKL.from_config(base, "float16")


def test_random_vae_without_quant_convs_or_attention():
    """Configs without quant convs or mid-block attention build without those parameters and still run."""
    config = {**json.loads((FIXTURE / vae_lib.CONFIG_NAME).read_text()), "use_quant_conv": False,
              "use_post_quant_conv": False, "mid_block_add_attention": False}
    vae = vae_lib.vae_from_config(config, jax.random.PRNGKey(0))
    keys = vae_lib.diffusers_shapes(vae.module)
    assert not any("quant_conv" in k or "attentions" in k for k in keys)
    assert vae.num_params() == sum(int(np.prod(s)) for s, _ in keys.values())
    mean, std = vae.encode(jnp.zeros((1, 16, 16, 3)))
    chex.assert_shape([mean, std], (1, 8, 8, 4))
    chex.assert_shape(vae.decode(mean), (1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"multiples of 2"):
        vae.encode(jnp.zeros((1, 15, 15, 3)))


def test_benchmark_reports_speed_and_flops():
    from hd.tools import bench_vae

    report = bench_vae.run(batch=2, resolution=16, dtype="float32", runs=2, warmup=0, vae_dir=str(FIXTURE))
    decode = report["decode"]
    assert report["params"] == 167_959 and decode["runs"] == 2
    assert decode["batch_s_min"] <= decode["batch_s_median"] <= decode["batch_s_max"]
    assert decode["images_per_s"] == pytest.approx(2 / decode["batch_s_median"])
    # At least the decoder's 3x3 convolutions at full resolution: up_blocks.1 (two 16-wide resnets, 4 convs) and
    # conv_out, 2 FLOPs per multiply-add on 16 x 16 pixels.
    assert decode["gflop_per_image"] * 1e9 > 2 * 16 * 16 * 9 * (4 * 16 * 16 + 16 * 3)
    if jax.default_backend() == "cpu":  # GPUs' compiled count misses the cuDNN convolutions
        assert decode["compiled_gflop_per_image"] == pytest.approx(decode["gflop_per_image"], rel=0.02)
