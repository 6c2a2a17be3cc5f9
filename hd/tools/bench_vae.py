"""Speed and cost of the SD-VAE decoder (and optionally encoder) on this machine's devices.

    python -m hd.tools.bench_vae [--batch=8] [--resolution=256] [--dtype=float32|bfloat16] [--runs=3]
        [--vae_dir=DIR] [--encode]

The decode of a batch of `--batch` latents (resolution / 8 on a side, 4 channels) is compiled ahead of time
(jax.jit(...).lower(...).compile()) and reports
- GFLOP per image from XLA's cost analysis of the program lowered for the CPU (the whole batch's FLOPs /
  batch), whatever device runs it: the compiled program's count (also reported) misses the convolutions on
  GPUs, where they become cuDNN calls that XLA's cost analysis skips (on the CPU the two agree to <1 %),
- images/s from the median wall time of --runs calls after --warmup calls (each waited for with
  block_until_ready), and the achieved GFLOP/s.
Weights are random (SD_VAE_CONFIG, the sd-vae-ft-ema architecture) unless --vae_dir names a diffusers folder:
the cost does not depend on their values. On a shared machine the speed is a lower bound.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hd.costs import cost_dict, lowered_cost
from hd.models import vae as vae_lib


def measure(fn: Callable, args: tuple, *, batch: int, runs: int, warmup: int) -> dict[str, Any]:
    """Compile fn(*args) ahead of time; its FLOPs and the median seconds of `runs` calls."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = lowered_cost(fn, args)["flops"]  # lowered for the CPU: the same HLO count on every backend
    compiled_flops = float(cost_dict(compiled.cost_analysis()).get("flops", float("nan")))
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return dict(compile_s=round(compile_s, 2), gflop_per_image=flops / batch / 1e9,
                compiled_gflop_per_image=compiled_flops / batch / 1e9, batch_s_median=seconds,
                batch_s_min=min(times), batch_s_max=max(times), runs=runs, images_per_s=batch / seconds,
                gflop_per_s=flops / seconds / 1e9)


def run(*, batch: int, resolution: int, dtype: str, runs: int, warmup: int, vae_dir: str = "",
        encode: bool = False) -> dict[str, Any]:
    if vae_dir:
        vae = vae_lib.load_vae(vae_dir, dtype=dtype)
    else:
        vae = vae_lib.vae_from_config(vae_lib.SD_VAE_CONFIG, jax.random.PRNGKey(0), dtype)
    factor = vae.module.downsampling
    if resolution % factor:
        raise app.UsageError(f"--resolution={resolution} must be a multiple of the VAE's downsampling {factor}")
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((batch, resolution // factor, resolution // factor,
                                               vae.module.latent_channels)) / vae.scaling_factor, jnp.float32)
    report = {"vae": vae_dir or "SD_VAE_CONFIG (random weights)", "params": vae.num_params(), "batch": batch,
              "resolution": resolution, "dtype": dtype, "device": jax.devices()[0].device_kind,
              "device_count_used": 1}
    report["decode"] = measure(vae.decode_fn, (vae.params, latents), batch=batch, runs=runs, warmup=warmup)
    if encode:
        images = jnp.asarray(rng.uniform(-1, 1, (batch, resolution, resolution, vae.module.in_channels)), jnp.float32)
        report["encode"] = measure(vae.encode_fn, (vae.params, images), batch=batch, runs=runs, warmup=warmup)
    return report


def main(argv: list[str]) -> None:
    del argv
    report = run(batch=_BATCH.value, resolution=_RESOLUTION.value, dtype=_DTYPE.value, runs=_RUNS.value,
                 warmup=_WARMUP.value, vae_dir=_VAE_DIR.value, encode=_ENCODE.value)
    print(json.dumps(report, indent=2))
    for name in ("decode", "encode"):
        if name in report:
            r = report[name]
            print(f"{name} {report['resolution']}x{report['resolution']} batch {report['batch']} {report['dtype']} "
                  f"on {report['device']}: {r['images_per_s']:.3f} images/s (median {r['batch_s_median']:.2f} s per "
                  f"batch over {r['runs']} runs), {r['gflop_per_image']:.1f} GFLOP per image, "
                  f"{r['gflop_per_s']:.1f} GFLOP/s achieved; compile {r['compile_s']} s")


if __name__ == "__main__":  # flags only here: importing this module defines none
    _BATCH = flags.DEFINE_integer("batch", 8, "Images per decode call.")
    _RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image side in pixels (latents are 1/8 of it).")
    _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
    _RUNS = flags.DEFINE_integer("runs", 3, "Timed calls (the median is reported).")
    _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling, before timing.")
    _VAE_DIR = flags.DEFINE_string("vae_dir", "", "A diffusers AutoencoderKL folder to load instead of random "
                                   "weights of SD_VAE_CONFIG.")
    _ENCODE = flags.DEFINE_bool("encode", False, "Also time the encoder on random images.")
    app.run(main)
