"""Sample grids of latent stages: config.sample.vae_dir's VAE is checked before anything runs, and the grid's
latents are decoded (latents / scaling_factor) into RGB images in one jitted call."""

from __future__ import annotations

import os

import chex
import jax
import numpy as np
import pytest

from conftest import load_config
from test_latent_pipeline import TINY_VAE_CONFIG  # 8x8x4 latents <-> 32x32x3 images, scaling_factor 0.5


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from hd.eval.inception import file_sha256
    from hd.models.vae import WEIGHTS_NAME, save_vae, vae_from_config

    directory = str(tmp_path_factory.mktemp("vae"))
    vae = vae_from_config(TINY_VAE_CONFIG, jax.random.PRNGKey(3))
    save_vae(vae, directory)
    return directory, file_sha256(os.path.join(directory, WEIGHTS_NAME)), vae


def _config(vae_dir: str, **overrides):
    return load_config("latent_tiny", "teacher", {"sample.vae_dir": vae_dir, **overrides})


def test_grid_is_the_decoded_rgb_image_of_each_latent(tiny_vae):
    from hd import parallel
    from hd.eval.inception import quantize_to_uint8
    from hd.train.loop import grid_decoder, load_grid_vae, render_samples

    directory, sha, saved = tiny_vae
    config = _config(directory, **{"sample.vae_sha256": sha})
    vae = load_grid_vae(config, (8, 8, 4))
    assert vae.scaling_factor == 0.5
    mesh = parallel.make_mesh(-1, 1)
    # 7 rows, 3 per call: padded to whole calls on every device, the padding dropped again.
    decode = grid_decoder(vae, mesh, rows_per_call=3)
    latents = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (7, 8, 8, 4))  # the model's scale: x scaling_factor
    images = np.asarray(decode(latents))
    chex.assert_shape(images, (7, 32, 32, 3))
    assert images.dtype == np.uint8
    # The reference: the saved VAE's own decode of the unscaled latents, quantised as FID does.
    expected = np.asarray(quantize_to_uint8(saved.decode(latents / 0.5)))
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert images.std() > 1.0  # not a constant image
    grid = render_samples(config, images)  # one row per class (10), one column
    chex.assert_shape(grid, (10 * 33 + 1, 33 + 1, 3))
    np.testing.assert_array_equal(grid[1:33, 1:33], images[0])


def test_empty_vae_dir_shows_the_data_as_is(tiny_vae):
    from hd.train.loop import load_grid_vae

    assert load_grid_vae(_config(""), (8, 8, 4)) is None


@pytest.mark.parametrize("case, match", [
    ("missing", r"config\.sample\.vae_dir='.*nowhere' lacks config\.json"),
    ("sha256", r"config\.sample\.vae_sha256='0+'.*has sha256"),
    ("channels", r"4 latent channels, but the examples have shape \(8, 8, 3\)"),
    ("scale", r"scaling_factor 0\.5, but the model trains on latents x config\.data\.latent_scale=0\.18215"),
    ("not_images", r"config\.sample\.vae_dir is set, but the examples .* have shape \(2,\)"),
])
def test_bad_vae_is_a_clear_error(tiny_vae, tmp_path, case, match):
    from hd.train.loop import load_grid_vae

    directory = tiny_vae[0]
    shape, overrides = (8, 8, 4), {}
    if case == "missing":
        directory = str(tmp_path / "nowhere")
    elif case == "sha256":
        overrides = {"sample.vae_sha256": "0" * 64}
    elif case == "channels":
        shape = (8, 8, 3)
    elif case == "scale":
        overrides = {"data.latent_scale": 0.18215}
    else:
        shape = (2,)
    with pytest.raises(ValueError, match=match):
        load_grid_vae(_config(directory, **overrides), shape)


def test_train_refuses_a_bad_vae_dir_before_writing(tmp_path):
    from hd.train.loop import train

    config = load_config("toy2d", "tiny", {"sample.vae_dir": str(tmp_path / "nowhere")})
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"config\.sample\.vae_dir="):
        train(config, str(workdir))
    assert not workdir.exists()
