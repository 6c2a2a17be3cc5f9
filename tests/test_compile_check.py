"""The TPU ahead-of-time compile check (hd.compile_check), the ImageNet-256 configs it exists for, and the
pieces it relies on: abstract stages, data.example_shape, DiT rematerialisation (jvp through it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config, subprocess_env

from hd import compile_check
from hd.config import check_example_shape, check_values, validate

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install \"jax[tpu]==<jax version>\", or -r requirements.txt on Linux "
           "x86_64): the compile check runs the TPU compiler")


def run_check(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    # A subprocess: libtpu and the TPU topology stay out of this pytest process, which runs on the CPU.
    return subprocess.run([sys.executable, "-m", "hd.compile_check", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@needs_libtpu
def test_tiny_sketch_compiles_for_a_tpu_slice_and_reports_memory():
    """Stage 1 (student and frozen teacher) of a tiny DiT on a 4-chip v5e slice, fully sharded, blocks scanned
    and rematerialised as in configs/imagenet256.py: the TPU compiler's per-chip memory, FLOPs, and every tree
    split over the chips. (Stage 2 takes the TPU compiler a minute even for the tiny DiT; its shardings are
    checked below without compiling.)"""
    proc = run_check(f"--config={REPO / 'configs/fashion_mnist.py'}:sketch_tiny", "--topology=v5e:2x2",
                     "--json=-", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                     "--config.data.example_shape=(28, 28, 1)", "--config.model.scan_blocks=True",
                     "--config.model.remat=True")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert (result["chips"], result["mesh"], result["device_kind"]) == (4, {"data": 1, "fsdp": 4}, "TPU v5 lite")
    memory = result["memory"]
    for key in ("argument_bytes", "output_bytes", "total_bytes"):
        assert memory[key] > 0, key
    assert memory["temp_bytes"] >= 0  # a tiny step's temporaries may all sit in on-chip memory (0 here)
    assert memory["total_bytes"] == (memory["argument_bytes"] + memory["temp_bytes"] + memory["output_bytes"]
                                     - memory["alias_bytes"])
    assert memory["alias_bytes"] > 0  # the donated state is updated in place
    assert result["fits"] is True and memory["total_bytes"] < result["hbm_bytes"] == 16 * 2 ** 30
    # A scanned program's compiled cost counts the loop body once; the step's FLOPs come from the unrolled one.
    assert result["flops_source"].startswith("unrolled")
    assert result["flops_per_step"] == 4 * result["flops_per_chip"] > 4 * result["compiled_flops_per_chip"] > 0
    assert set(result["trees"]) == {"params", "ema_params", "opt_state", "frozen_teacher"}
    for name, tree in result["trees"].items():  # kernels and embeddings split 4 ways; biases stay whole
        assert tree["bytes_per_device"] < 0.4 * tree["bytes"], (name, tree)


def test_bad_topology_names_are_clear_errors():
    for name, words in [("v9:2x2", "unknown TPU generation"), ("v4:2x2", "3 positive dimensions"),
                        ("v5e-16", "GENERATION:AxB"), ("v5e:0x4", "2 positive dimensions")]:
        with pytest.raises(compile_check.CheckError, match=words):
            compile_check.parse_topology(name)
    assert compile_check.parse_topology("v4:2x2x4") == ("v4", (2, 2, 4))
    assert compile_check.parse_topology("v5e:4x4") == ("v5e", (4, 4))


def test_mesh_that_does_not_cover_the_slice_fails_before_compiling():
    config = load_config("fashion_mnist", "sketch_tiny", {"mesh.data": 3, "mesh.fsdp": 1,
                                                          "data.example_shape": (28, 28, 1)})
    # Raised from the topology name alone: libtpu is never loaded, nothing is traced.
    with pytest.raises(compile_check.CheckError, match=r"v5e:2x2 \(4 chips\).*config.mesh=\(data=3, fsdp=1\)"):
        compile_check.compile_check(config, "v5e:2x2")


def test_command_line_errors_exit_2_with_the_reason():
    proc = run_check(f"--config={REPO / 'configs/fashion_mnist.py'}:sketch_tiny", "--topology=v5e:2x2",
                     "--config.mesh.fsdp=8", "--config.mesh.data=1", timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit 4 devices" in proc.stderr and "Traceback" not in proc.stderr


def test_out_of_memory_errors_of_the_tpu_compiler_are_read():
    # As measured: XL/2 sketch, blocks scanned without remat, on v5e:4x4 (README, "TPU compile check").
    oom = compile_check._out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                       "HLO temporaries (71.43G) exceeds available HBM (15.75G).")
    assert (oom["temp_bytes"], oom["capacity_bytes"]) == (int(71.43 * 2 ** 30), int(15.75 * 2 ** 30))
    oom = compile_check._out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of "
                                       "15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert (oom["used_bytes"], oom["capacity_bytes"]) == (int(20.5 * 2 ** 30), int(15.75 * 2 ** 30))
    assert compile_check._out_of_memory("INVALID_ARGUMENT: something else") is None


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(compile_check.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(compile_check.CheckError, match=r'pip install "jax\[tpu\]==' + jax.__version__):
        compile_check.require_libtpu()


@pytest.mark.parametrize("variant", ["teacher", "sketch", "refine"])
def test_imagenet256_configs_validate_for_16_chips(variant):
    config = load_config("imagenet256", variant)
    assert (config.model.size, config.model.patch_size, config.batch_size) == ("XL", 2, 256)
    assert tuple(config.data.example_shape) == (32, 32, 4) and config.data.num_classes == 1000
    check_values(config, 16)  # no hand-off directories: the compile check reads none


def test_abstract_stages_need_no_checkpoint():
    """Teacher and generator trees are abstract: the work directories the configs name are never read."""
    from hd.train.stages import abstract_stage

    for variant, frozen in [("tiny", False), ("sketch_tiny", True), ("refine_tiny", True)]:
        config = load_config("toy2d", variant, {"sketch.teacher_workdir": "/nonexistent",
                                                 "refine.teacher_workdir": "/nonexistent"})
        stage, state = abstract_stage(config, (2,))
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state))
        assert (stage.frozen is not None) == frozen and stage.name == config.stage


def test_imagenet256_refine_shards_every_network_over_fsdp():
    """Generator, its EMA and Adam moments, fake score, AWD head, their optimizer state and the frozen
    teacher: every leaf over 64 KiB is split 16 ways, and what stays whole is < 0.1 % of the bytes."""
    from hd import parallel
    from hd.train.stages import abstract_stage

    config = load_config("imagenet256", "refine")
    stage, state = abstract_stage(config, tuple(config.data.example_shape))
    mesh = jax.sharding.AbstractMesh((1, 16), parallel.AXES)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    trees = {"state": state, "frozen_teacher": stage.frozen}
    assert set(state.critic_params) == {"fake_score", "head"}
    total = whole = 0
    for name, tree in trees.items():
        shardings = parallel.tree_shardings(tree, mesh, rules)
        for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
            size = leaf.size * leaf.dtype.itemsize
            total += size
            if "fsdp" not in sharding.spec:
                whole += size
                assert size <= 2 ** 16, f"{name}/{jax.tree_util.keystr(path)} {leaf.shape} is not sharded"
    assert total > 8 * 4 * 600e6  # 8 copies of ~675 M float32 parameters
    assert whole < 1e-3 * total


def test_config_example_shape_and_remat_are_checked():
    base = {"refine.teacher_workdir": "t", "refine.sketch_workdir": "s"}
    for shape, words in [((28, 28), r"\(H, W, C\)"), ((28, 27, 1), "square"), ((28, 28, 0), "positive")]:
        with pytest.raises(ValueError, match=words):
            validate(load_config("fashion_mnist", "refine_tiny", {**base, "data.example_shape": shape}), 1)
    validate(load_config("fashion_mnist", "refine_tiny", {**base, "data.example_shape": (28, 28, 1)}), 1)
    with pytest.raises(ValueError, match=r"\(D,\)"):
        validate(load_config("toy2d", "tiny", {"data.example_shape": (2, 2, 1)}), 1)
    with pytest.raises(ValueError, match="remat"):
        validate(load_config("toy2d", "tiny", {"model.remat": True}), 1)
    data_cfg = load_config("imagenet256", "sketch").data
    assert check_example_shape(data_cfg, (32, 32, 4)) == (32, 32, 4)
    with pytest.raises(ValueError, match=r"example_shape=\(32, 32, 4\).*\(64, 64, 4\)"):
        check_example_shape(data_cfg, np.array([64, 64, 4]))


def test_remat_and_scanned_dit_match_the_plain_one_through_jvp_and_grad():
    """Rematerialisation and scanning change only how the blocks run: the same parameter tree, outputs, middle
    block tokens, and the sketch loss's jvp and its gradient."""
    from hd.models.dit import DiT

    kwargs = dict(input_size=8, in_channels=2, num_classes=3, patch_size=2, hidden_size=16, depth=2, num_heads=2)
    rng = np.random.default_rng(0)
    x, v = (rng.standard_normal((2, 8, 8, 2)).astype(np.float32) for _ in range(2))
    t, r, y = np.float32([0.7, 0.3]), np.float32([0.2, 0.3]), np.int32([0, 3])
    plain = DiT(**kwargs)
    # Parameters of the right shapes drawn with numpy (compiling flax's initialisers costs ~15 s on this CPU):
    # non-zero modulation and h-embedding output, so every block and both time embeddings matter.
    shapes = jax.eval_shape(plain.init, jax.random.PRNGKey(0), x, t, t - r, y)["params"]
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)

    def outputs(model, p):
        # Tokens of the first block (scanned: two scans) and of the last (the second scan is empty).
        forward = [model.apply({"params": p}, x, t, t - r, y, return_tokens_at=b) for b in (0, 1)]

        def loss(p):
            fn = lambda z, tt, rr: model.apply({"params": p}, z, tt, tt - rr, y)
            u, dudt = jax.jvp(fn, (x, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
            target = jax.lax.stop_gradient(v - (t - r)[:, None, None, None] * dudt)
            return jnp.mean((u - target) ** 2), (u, dudt)

        return forward, jax.value_and_grad(loss, has_aux=True)(p)

    outputs = jax.jit(outputs, static_argnums=0)  # flax modules are hashable
    expected = outputs(plain, params)
    for variant in (dict(remat=True), dict(scan_blocks=True, remat=True)):  # what configs/imagenet256.py runs
        model = DiT(**kwargs, **variant)
        assert jax.tree.structure(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t - r, y)["params"]) == \
            jax.tree.structure(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(variant)),
                     outputs(model, params), expected)


@needs_libtpu
def test_vae_decode_compiles_for_a_tpu_slice_and_reports_memory():
    """--target=vae_decode on the tiny fixture VAE: the global batch is split over the 4 chips, the parameters
    are replicated, and per-chip memory and FLOPs come from the TPU compiler."""
    proc = run_check("--target=vae_decode", "--topology=v5e:2x2", "--json=-",
                     f"--vae_config={REPO / 'tests/fixtures/vae_tiny/config.json'}", "--vae_batch_per_chip=2",
                     "--vae_resolution=16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert (result["target"], result["chips"], result["batch_size"]) == ("vae_decode", 4, 8)
    assert (result["latent_shape"], result["image_shape"]) == ([8, 8, 4], [16, 16, 3])
    params = result["trees"]["decoder_params"]  # replicated float32, the decoder's share of the VAE's
    assert params["bytes"] == params["bytes_per_device"] == params["replicated_bytes"] < 4 * result["num_params"]
    memory = result["memory"]
    # Each chip holds the parameters and its 2 latents, and writes its 2 images (16 x 16 x 3 float32).
    assert memory["argument_bytes"] >= params["bytes"] + 2 * 8 * 8 * 4 * 4
    assert memory["output_bytes"] >= 2 * 16 * 16 * 3 * 4
    assert result["fits"] is True and 0 < memory["total_bytes"] < result["hbm_bytes"]
    assert result["flops_per_chip"] > 0 and result["flops_per_image"] == result["flops_per_chip"] / 2


def test_vae_decode_check_errors_come_before_libtpu():
    from hd.models.vae import SD_VAE_CONFIG

    for kwargs, words in [(dict(resolution=100), "multiple of the VAE's downsampling factor 8"),
                          (dict(batch_per_chip=0), "at least 1")]:
        with pytest.raises(compile_check.CheckError, match=words):
            compile_check.compile_vae_decode(SD_VAE_CONFIG, "v5e:2x2", **kwargs)
    with pytest.raises(compile_check.CheckError, match="must divide"):
        compile_check.compile_vae_decode({**SD_VAE_CONFIG, "norm_num_groups": 7}, "v5e:2x2")
    with pytest.raises(compile_check.CheckError, match="cannot read a diffusers config.json"):
        compile_check.read_vae_config("/nonexistent/config.json")
    proc = run_check("--topology=v5e:2x2", timeout=60)  # the train step (the default target) needs a config
    assert proc.returncode == 2 and "--config is required" in proc.stderr, proc.stderr[-3000:]
