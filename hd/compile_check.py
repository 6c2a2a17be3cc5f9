"""Ahead-of-time compile check of a stage's train step for a TPU slice, on any machine (a CPU is enough).

    python -m hd.compile_check --config=configs/imagenet256.py:sketch --topology=v4:2x2x4 [--json=FILE|-]
        [--config.a.b=v ...]

libtpu describes the slice (`jax.experimental.topologies.get_topology_desc`); the stage is built around
abstract teacher/generator trees (no checkpoint, no dataset: the example shape comes from
`config.data.example_shape`), and its step is jitted with the shardings the training loop uses
(`hd.train.loop.compile_train_step`: the config's (data, fsdp) mesh over the slice's chips, regex sharding
rules, donated state), lowered and compiled by the TPU compiler. Prints per-chip memory from
`compiled.memory_analysis()`, FLOPs from `compiled.cost_analysis()` (for scanned DiT blocks, which XLA counts
once, from the unrolled step's lowering), the chip's HBM and FITS / DOES NOT FIT.

The VAE decode (`--target=vae_decode`): the SD-VAE decoder (hd.models.vae; `--vae_config` for another
diffusers config.json) on a global batch of `--vae_batch_per_chip` x chips latents for `--vae_resolution`
images, split over every chip, parameters replicated; the same per-chip memory, FLOPs and verdict:

    python -m hd.compile_check --target=vae_decode --topology=v5e:4x4 [--vae_batch_per_chip=64]
        [--vae_resolution=256] [--vae_dtype=float32|bfloat16] [--vae_config=config.json] [--json=FILE|-]

The evaluation step (`--target=eval`, same flags): that decode, then uint8 and the FID InceptionV3 on the decoded
images (hd.eval.evaluator.evaluation_step, what the FID-50K evaluation runs per batch), Inception's variables
replicated too.

Exit status: 0 fits, 1 does not fit, 2 the check could not run (bad topology, a mesh that does not cover the
slice, libtpu missing, an invalid config).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from hd import cli, parallel
from hd.config import check_values, copy_with
from hd.data import load_source
from hd.eval.evaluator import evaluation_step
from hd.eval.inception import abstract_inception_variables
from hd.models import vae as vae_lib
from hd.models.vae import CONFIG_NAME, SD_VAE_CONFIG
from hd.train.loop import compile_train_step
from hd.train.stages import abstract_stage

# Generations this check knows: HBM per chip (GiB), the chip config libtpu is asked for, and the number of
# dimensions of a topology name. v4 and v5p chips hold two TensorCores that JAX drives as one device
# ("megacore"); libtpu's default for v4 would list each core as a device.
TPU_CHIPS = {
    "v4": dict(hbm_gib=32, chip_config="megacore", dims=3, accelerator="v4-{cores}"),
    "v5e": dict(hbm_gib=16, chip_config="default", dims=2, accelerator="v5litepod-{chips}"),
    "v5p": dict(hbm_gib=95, chip_config="megacore", dims=3, accelerator="v5p-{cores}"),
    "v6e": dict(hbm_gib=32, chip_config="default", dims=2, accelerator="v6e-{chips}"),
}
GIB = 2 ** 30


class CheckError(ValueError):
    """The check could not run: the message says what to fix."""


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v4:2x2x4' -> ('v4', (2, 2, 4)); a clear error for anything this check does not know."""
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.strip())
    if not match:
        raise CheckError(f"--topology={name!r} is not GENERATION:AxB[xC], e.g. v4:2x2x4, v5p:2x2x1, v5e:4x4, v6e:2x2")
    generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    if generation not in TPU_CHIPS:
        raise CheckError(f"--topology={name!r}: unknown TPU generation {generation!r}; known: {sorted(TPU_CHIPS)}")
    want = TPU_CHIPS[generation]["dims"]
    if len(dims) != want or min(dims) < 1:
        example = "2x2x4" if want == 3 else "4x4"
        raise CheckError(f"--topology={name!r}: {generation} slices have {want} positive dimensions "
                         f"(e.g. {generation}:{example})")
    return generation, dims


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise CheckError(
            "libtpu is not installed, and the TPU compiler is what this check runs. Install the build that "
            f"matches jax {jax.__version__}: pip install \"jax[tpu]=={jax.__version__}\" (on Linux x86_64, "
            "`pip install -r requirements.txt` brings it too). No TPU is needed.")


def tpu_devices(topology: str) -> tuple[list, str]:
    """Compile-only devices of a TPU slice (one per chip) and the generation."""
    generation, dims = parse_topology(topology)
    require_libtpu()
    chip = TPU_CHIPS[generation]
    chips = math.prod(dims)
    # Nothing here opens a TPU: skip libtpu's one-process-per-host lock (/tmp/libtpu_lockfile, held by any
    # JAX process that tried its TPU backend), and keep its start-up quiet on a machine without TPUs.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", chip["accelerator"].format(chips=chips, cores=2 * chips))
    from jax.experimental import topologies  # local: loads libtpu, after the TPU_* variables above are set

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology.strip(),
                                               chip_config_name=chip["chip_config"]).devices
    except Exception as e:  # JaxRuntimeError INVALID_ARGUMENT for shapes libtpu does not build
        raise CheckError(f"libtpu has no TPU slice --topology={topology!r}: {e}") from e
    if len(devices) != chips:
        raise CheckError(f"--topology={topology!r}: libtpu gave {len(devices)} devices for {chips} chips")
    return list(devices), generation


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """config.data.example_shape, or the dataset's when that is () (the dataset must then be readable here)."""
    if tuple(config.data.example_shape):
        return tuple(config.data.example_shape)
    try:
        return tuple(load_source(config.data).example_shape)
    except Exception as e:
        raise CheckError(f"config.data.example_shape is () and the dataset cannot be opened here ({e}); set "
                         "--config.data.example_shape, e.g. '(32, 32, 4)'") from e


def _tree_bytes(tree: Any, shardings: Any) -> dict[str, int]:
    """Total bytes of a tree, bytes per device under its shardings, and bytes of the leaves kept whole."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = per_device = replicated = 0
    for leaf, sharding in zip(leaves, specs):
        size = np.dtype(leaf.dtype).itemsize
        full = math.prod(leaf.shape) * size
        shard = math.prod(sharding.shard_shape(tuple(leaf.shape))) * size
        total, per_device = total + full, per_device + shard
        replicated += full if shard == full else 0
    return dict(bytes=total, bytes_per_device=per_device, replicated_bytes=replicated)


def _out_of_memory(message: str) -> dict | None:
    """What the TPU compiler's out-of-HBM error says (XLA prints 1024-based K/M/G), if `message` is one."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    size = lambda number, unit: int(float(number) * 1024 ** " KMGT".index(unit or " "))
    out = {"message": message.strip()[:4000]}
    temps = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", message)
    used = re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", message)
    if temps:
        out.update(temp_bytes=size(*temps.group(1, 2)), capacity_bytes=size(*temps.group(3, 4)))
    elif used:
        out.update(used_bytes=size(*used.group(1, 2)), capacity_bytes=size(*used.group(3, 4)))
    return out


def unrolled_flops(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> float:
    """FLOPs of one whole step (all chips) from XLA's cost analysis of the step with the DiT blocks unrolled,
    lowered for one CPU device (before optimisation: lowering only, so XL takes seconds)."""
    config = copy_with(config, {"model.scan_blocks": False})
    stage, abstract_state = abstract_stage(config, data_shape)
    mesh = parallel.make_mesh(1, 1, jax.devices("cpu")[:1])
    step, state_sharding, frozen_sharding, batch_sharding = compile_train_step(
        stage, mesh, tuple(tuple(r) for r in config.sharding_rules), abstract_state)
    lowered = step.lower(_abstract(abstract_state, state_sharding),
                         _abstract_batch(config, data_shape, batch_sharding), _abstract(stage.frozen, frozen_sharding))
    return float(lowered.cost_analysis()["flops"])


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _abstract_batch(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], sharding: Any) -> dict:
    """What the data pipeline yields: float32 examples 'x' and int32 labels 'y' (hd.data.sources)."""
    return {"x": jax.ShapeDtypeStruct((config.batch_size, *data_shape), jnp.float32, sharding=sharding),
            "y": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding)}


def compile_check(config: ml_collections.ConfigDict, topology: str) -> dict:
    """Lower and compile `config`'s train step for the TPU slice `topology`; returns what it measured."""
    generation, dims = parse_topology(topology)
    chips = math.prod(dims)
    # The config is checked against the slice before libtpu is even loaded: a mesh that does not cover the
    # chips, a batch that does not divide over them, any invalid value. The hand-off work directories are not
    # checked: the trees are abstract, nothing is read.
    try:
        check_values(config, chips)
    except ValueError as e:
        raise CheckError(f"config does not fit --topology={topology} ({chips} chips): {e}") from e
    devices, _ = tpu_devices(topology)
    data_shape = example_shape(config)

    t0 = time.perf_counter()
    stage, abstract_state = abstract_stage(config, data_shape)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    step, state_sharding, frozen_sharding, batch_sharding = compile_train_step(stage, mesh, rules, abstract_state)
    lowered = step.lower(_abstract(abstract_state, state_sharding),
                         _abstract_batch(config, data_shape, batch_sharding), _abstract(stage.frozen, frozen_sharding))
    lower_s = time.perf_counter() - t0

    trees = {name: _tree_bytes(getattr(abstract_state, name), getattr(state_sharding, name))
             for name in ("params", "ema_params", "opt_state", "critic_params", "critic_opt_state")
             if hasattr(abstract_state, name)}
    if stage.frozen is not None:
        trees["frozen_teacher"] = _tree_bytes(stage.frozen, frozen_sharding)

    hbm = TPU_CHIPS[generation]["hbm_gib"] * GIB
    result = dict(
        topology=topology.strip(), generation=generation, chips=chips, device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape), stage=config.stage, model=f"{config.model.name}-{config.model.size}/"
        f"{config.model.patch_size}" if config.model.name == "dit" else config.model.name,
        dtype=config.model.dtype, remat=bool(config.model.get("remat", False)),
        scan_blocks=bool(config.model.get("scan_blocks", False)), batch_size=config.batch_size,
        example_shape=list(data_shape), hbm_bytes=hbm, trees=trees, lower_seconds=round(lower_s, 1))

    flops = _compile_into(lowered, result)
    if flops is None:
        return result
    result["compiled_flops_per_chip"] = flops
    if config.model.get("scan_blocks", False):
        # XLA's cost analysis counts a loop body once: take the FLOPs of the same step with the blocks unrolled.
        result.update(flops_per_step=unrolled_flops(config, data_shape), flops_source="unrolled step, CPU lowering")
        result["flops_per_chip"] = result["flops_per_step"] / chips
    else:
        result.update(flops_per_chip=flops, flops_per_step=flops * chips, flops_source="compiled")
    return result


def _compile_into(lowered: Any, result: dict) -> float | None:
    """Compile for the TPU and record in `result` the compile time, per-chip memory and whether it fits
    result['hbm_bytes'] (or the compiler's out-of-HBM error). Returns the compiled FLOPs per chip, None on OOM."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that do not fit HBM
        oom = _out_of_memory(str(e))
        if oom is None:
            raise
        result.update(fits=False, compile_seconds=round(time.perf_counter() - t0, 1), compiler_out_of_memory=oom)
        return None
    result["compile_seconds"] = round(time.perf_counter() - t0, 1)
    stats = compiled.memory_analysis()
    memory = {f"{k}_bytes": int(getattr(stats, f"{k}_size_in_bytes"))
              for k in ("argument", "output", "alias", "temp", "generated_code")}
    # Per chip: the donated state is an argument and an output at once (aliased), so it counts once.
    memory["total_bytes"] = (memory["argument_bytes"] + memory["temp_bytes"] + memory["output_bytes"]
                             - memory["alias_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.update(memory=memory, fits=memory["total_bytes"] + memory["generated_code_bytes"] <= result["hbm_bytes"])
    return float(cost.get("flops", float("nan")))


def read_vae_config(spec: str) -> tuple[dict, str]:
    """--vae_config: '' is the SD-VAE (hd.models.vae.SD_VAE_CONFIG); else a config.json or a folder holding one."""
    if not spec:
        return dict(SD_VAE_CONFIG), "SD_VAE_CONFIG"
    path = os.path.join(spec, CONFIG_NAME) if os.path.isdir(spec) else spec
    try:
        with open(path) as f:
            return json.load(f), path
    except (OSError, ValueError) as e:
        raise CheckError(f"--vae_config={spec!r}: cannot read a diffusers config.json from {path} ({e})") from e


def compile_vae_decode(vae_config: dict, topology: str, *, batch_per_chip: int = 64, resolution: int = 256,
                       dtype: str = "float32", inception: bool = False) -> dict:
    """Lower and compile the VAE decode of batch_per_chip x chips latents, split over the slice's chips; with
    inception=True the evaluation step (decode, uint8, FID Inception: hd.eval.evaluator.evaluation_step)."""
    generation, dims = parse_topology(topology)
    chips = math.prod(dims)
    try:
        module = vae_lib.AutoencoderKL.from_config(vae_config, dtype)
    except ValueError as e:
        raise CheckError(f"--vae_config: {e}") from e
    if batch_per_chip < 1:
        raise CheckError(f"--vae_batch_per_chip={batch_per_chip} must be at least 1")
    if resolution < 1 or resolution % module.downsampling:
        raise CheckError(f"--vae_resolution={resolution} must be a positive multiple of the VAE's downsampling "
                         f"factor {module.downsampling}")
    devices, _ = tpu_devices(topology)
    batch_size, side = batch_per_chip * chips, resolution // module.downsampling

    t0 = time.perf_counter()
    mesh = parallel.make_mesh(chips, 1, devices)
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    params = vae_lib.abstract_params(module)
    decode = lambda p, z: module.apply({"params": p}, z, method="decode")
    latents = jax.ShapeDtypeStruct((batch_size, side, side, module.latent_channels), jnp.float32)
    if inception:
        step = evaluation_step(decode, float(vae_lib.check_config(vae_config)["scaling_factor"]))
        inception_variables = abstract_inception_variables()
        lowered = jax.jit(step, in_shardings=(replicated, replicated, batch), out_shardings=batch).lower(
            params, inception_variables, latents)
    else:
        lowered = jax.jit(decode, in_shardings=(replicated, batch), out_shardings=batch).lower(params, latents)
    lower_s = time.perf_counter() - t0

    hbm = TPU_CHIPS[generation]["hbm_gib"] * GIB
    # The decode reads the decoder and post_quant_conv only; jit drops the encoder's parameters from its inputs.
    decoder = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    decoder_tree = _tree_bytes(decoder, jax.tree.map(lambda _: replicated, decoder))
    trees = {"decoder_params": decoder_tree}
    if inception:
        trees["inception_variables"] = _tree_bytes(inception_variables,
                                                   jax.tree.map(lambda _: replicated, inception_variables))
    result = dict(
        target="eval" if inception else "vae_decode", topology=topology.strip(), generation=generation, chips=chips,
        device_kind=devices[0].device_kind, mesh=dict(mesh.shape), dtype=dtype, batch_size=batch_size,
        batch_per_chip=batch_per_chip, image_shape=[resolution, resolution, module.out_channels],
        latent_shape=[side, side, module.latent_channels],
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)), hbm_bytes=hbm,
        trees=trees, lower_seconds=round(lower_s, 1))
    flops = _compile_into(lowered, result)
    if flops is not None:
        result.update(flops_per_chip=flops, flops_per_image=flops / batch_per_chip)
    return result


def format_vae_result(result: dict, label: str = "") -> str:
    h, w, _ = result["image_shape"]
    lines = [
        f"target       {'VAE decode' if result['target'] == 'vae_decode' else 'eval step: VAE decode + FID Inception'}"
        f" ({label or 'SD_VAE_CONFIG'}, {result['num_params'] / 1e6:.2f} M parameters, "
        f"{result['dtype']}): latents {tuple(result['latent_shape'])} -> images {h}x{w}",
        f"slice        {result['topology']}: {result['chips']} chips ({result['device_kind']}), batch "
        f"{result['batch_size']} ({result['batch_per_chip']} per chip) split over "
        + " x ".join(f"{k}={v}" for k, v in result["mesh"].items()),
    ]
    lines += _tree_lines(result)
    m = result.get("memory", {})
    if m:
        lines.append(f"per chip     arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])}, "
                     f"temporaries {_gib(m['temp_bytes'])}, code {_gib(m['generated_code_bytes'])}")
        lines.append(f"             total (args + temps + outputs - aliases) {_gib(m['total_bytes'])} of "
                     f"{_gib(result['hbm_bytes'])} HBM ({m['total_bytes'] / result['hbm_bytes']:.0%})")
        lines.append(f"FLOPs        {result['flops_per_chip']:.4g} per chip ({result['flops_per_image'] / 1e9:.4g} "
                     "GFLOP per image; compiled)")
    return "\n".join(lines + _verdict_lines(result))


def _verdict_lines(result: dict) -> list[str]:
    """The compiler's out-of-HBM message if any, the times, and FITS / DOES NOT FIT."""
    lines = []
    if "compiler_out_of_memory" in result:
        oom = result["compiler_out_of_memory"]
        lines.append(f"per chip     the TPU compiler ran out of HBM: {oom['message'].splitlines()[0]}")
    lines.append(f"time         lowering {result['lower_seconds']} s, compiling {result['compile_seconds']} s")
    lines.append("FITS" if result["fits"] else "DOES NOT FIT")
    return lines


def _tree_lines(result: dict) -> list[str]:
    """One line per tree: its bytes in all, per chip, and how much of it is replicated."""
    return [f"  {name:<16}{_gib(t['bytes']):>12} in all, {_gib(t['bytes_per_device']):>10} per chip "
            f"({_gib(t['replicated_bytes'])} of it replicated)" for name, t in result["trees"].items()]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def format_result(result: dict, config_name: str = "") -> str:
    lines = [
        f"config       {config_name} (stage {result['stage']}, {result['model']}, {result['dtype']}, "
        f"remat={result['remat']}, scan_blocks={result['scan_blocks']}, batch {result['batch_size']}, "
        f"examples {tuple(result['example_shape'])})",
        f"slice        {result['topology']}: {result['chips']} chips ({result['device_kind']}), mesh "
        + " x ".join(f"{k}={v}" for k, v in result["mesh"].items()),
    ]
    lines += _tree_lines(result)
    m = result.get("memory", {})
    hbm = result["hbm_bytes"]
    if "argument_bytes" in m:
        lines.append(f"per chip     arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])}, "
                     f"aliased {_gib(m['alias_bytes'])}, temporaries {_gib(m['temp_bytes'])}, "
                     f"code {_gib(m['generated_code_bytes'])}")
        lines.append(f"             total (args + temps + outputs - aliases) {_gib(m['total_bytes'])} of "
                     f"{_gib(hbm)} HBM ({m['total_bytes'] / hbm:.0%})")
        lines.append(f"FLOPs        {result['flops_per_step']:.4g} per step ({result['flops_per_chip']:.4g} per chip; "
                     f"{result['flops_source']})")
    return "\n".join(lines + _verdict_lines(result))


def compile_only() -> None:
    """Before any device is touched: JAX itself stays on the CPU (no TPU here, and none is needed), and the
    persistent compilation cache (tests set one) is not asked to store TPU executables."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)


def main() -> None:
    if _TARGET.value in ("vae_decode", "eval"):
        _vae_main()
    config = _CONFIG.value
    if config is None:
        print("hd.compile_check: --config is required for --target=train_step (e.g. "
              "--config=configs/imagenet256.py:sketch)", file=sys.stderr)
        sys.exit(2)
    try:
        result = compile_check(config, _TOPOLOGY.value)
    except CheckError as e:
        print(f"hd.compile_check: {e}", file=sys.stderr)
        sys.exit(2)
    config_flag = flags.FLAGS["config"]
    overrides = config_flags.get_override_values(config_flag)
    result["config"] = config_flags.get_config_filename(config_flag)
    result["overrides"] = {k: repr(v) for k, v in overrides.items()}
    if _JSON.value == "-":
        print(json.dumps(result, indent=2))
    else:
        label = " ".join([result["config"], *(f"--config.{k}={v}" for k, v in result["overrides"].items())])
        print(format_result(result, label))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(result, f, indent=2)
    sys.exit(0 if result["fits"] else 1)


def _vae_main() -> None:
    try:
        vae_config, label = read_vae_config(_VAE_CONFIG.value)
        result = compile_vae_decode(vae_config, _TOPOLOGY.value, batch_per_chip=_VAE_BATCH.value,
                                    resolution=_VAE_RESOLUTION.value, dtype=_VAE_DTYPE.value,
                                    inception=_TARGET.value == "eval")
    except CheckError as e:
        print(f"hd.compile_check: {e}", file=sys.stderr)
        sys.exit(2)
    result["vae_config"] = label
    if _JSON.value == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_vae_result(result, label))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(result, f, indent=2)
    sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":  # flags only here: importing this module (tests, notebooks) defines none
    _CONFIG = cli.config_variant_flag("Config file and variant, e.g. configs/imagenet256.py:sketch "
                                      "(--target=train_step).")
    _TARGET = flags.DEFINE_enum("target", "train_step", ["train_step", "vae_decode", "eval"],
                                "What to compile: the config's train step, the VAE decode or the evaluation step "
                                "(decode + FID Inception; --vae_* flags).")
    _VAE_CONFIG = flags.DEFINE_string("vae_config", "", "--target=vae_decode: a diffusers AutoencoderKL config.json "
                                      "(or its folder); default the SD-VAE's (sd-vae-ft-ema).")
    _VAE_BATCH = flags.DEFINE_integer("vae_batch_per_chip", 64, "--target=vae_decode: latents per chip (global batch "
                                      "= this x chips, split over every chip).")
    _VAE_RESOLUTION = flags.DEFINE_integer("vae_resolution", 256, "--target=vae_decode: image side in pixels.")
    _VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "--target=vae_decode: compute "
                                   "dtype (parameters stay float32).")
    _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice GENERATION:AxB[xC], e.g. v4:2x2x4, v5e:4x4.")
    _JSON = flags.DEFINE_string("json", "", "Also write the results as JSON to this file ('-': JSON to stdout "
                                "instead of the table).")
    compile_only()
    cli.start(main, "hd.compile_check", required=["topology"], variant_config=True)
