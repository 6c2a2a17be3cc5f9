"""The whole HD pipeline: teacher -> sketch -> refine -> evaluation, each stage in its own sub-directory of
the work directory, handing over through checkpoints. Rerunning skips finished stages and resumes an
interrupted one.

    python -m hd.pipeline --config=configs/fashion_mnist.py --workdir=runs/fmnist [--profile=tiny]

The config file supplies one variant per stage: `teacher`, `sketch`, `refine`, `eval` (profile 'default')
or `tiny`, `sketch_tiny`, `refine_tiny`, `eval_tiny` (profile 'tiny').
"""

from __future__ import annotations

import importlib.util
import os
import time

import ml_collections
from absl import app, flags, logging

from hd import parallel

_CONFIG = flags.DEFINE_string("config", None, "Config file with per-stage variants, e.g. configs/fashion_mnist.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline work directory; each stage gets a sub-directory.")
_PROFILE = flags.DEFINE_enum("profile", "default", ["default", "tiny"], "Which set of variants to run.")
_SET = flags.DEFINE_multi_string("set", [], "Override for every stage, KEY=VALUE (e.g. seed=1).")
_DISTRIBUTED = parallel.define_distributed_flags()  # several processes: as for hd.main

VARIANTS = {
    "default": {"teacher": "teacher", "sketch": "sketch", "refine": "refine", "eval": "eval"},
    "tiny": {"teacher": "tiny", "sketch": "sketch_tiny", "refine": "refine_tiny", "eval": "eval_tiny"},
}


def load_config_file(path: str):
    spec = importlib.util.spec_from_file_location("hd_config_file", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """KEY=VALUE strings on a locked config; the value is parsed with the type of the existing field."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        current = node[leaf]
        if isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            value = type(current)(raw)
        else:
            value = raw
        node[leaf] = value
    return config


def stage_configs(config_path: str, workdir: str, profile: str = "default",
                  overrides: tuple[str, ...] = ()) -> dict[str, ml_collections.ConfigDict]:
    """The four stage configs wired to each other's work directories."""
    module = load_config_file(config_path)
    names = VARIANTS[profile]
    configs = {stage: apply_overrides(module.get_config(variant), list(overrides)) for stage, variant in names.items()}
    dirs = stage_dirs(workdir)
    configs["sketch"].sketch.teacher_workdir = dirs["teacher"]
    configs["refine"].refine.teacher_workdir = dirs["teacher"]
    configs["refine"].refine.sketch_workdir = dirs["sketch"]
    configs["eval"].eval.teacher_workdir = dirs["teacher"]
    configs["eval"].eval.students = f"sketch={dirs['sketch']},refine={dirs['refine']}"
    return configs


def stage_dirs(workdir: str) -> dict[str, str]:
    return {stage: os.path.join(os.path.abspath(workdir), stage) for stage in ("teacher", "sketch", "refine", "eval")}


def finished(workdir: str, num_steps: int) -> bool:
    from hd.checkpoint import latest_step
    return latest_step(workdir) == num_steps


def run_pipeline(config_path: str, workdir: str, profile: str = "default", overrides: tuple[str, ...] = ()) -> list[dict]:
    from hd.eval.evaluator import evaluate, results_table
    from hd.train.loop import train

    configs = stage_configs(config_path, workdir, profile, overrides)
    dirs = stage_dirs(workdir)
    timings = {}
    pipeline_start = time.perf_counter()
    for stage in ("teacher", "sketch", "refine"):
        if finished(dirs[stage], configs[stage].num_steps):
            logging.info("%s: finished earlier (%s), skipping", stage, dirs[stage])
            continue
        logging.info("=== stage %s -> %s", stage, dirs[stage])
        start = time.perf_counter()
        train(configs[stage], dirs[stage])
        timings[stage] = time.perf_counter() - start

    results_path = os.path.join(dirs["eval"], "results.json")
    if os.path.exists(results_path):
        import json
        logging.info("eval: finished earlier (%s), skipping", results_path)
        with open(results_path) as f:
            entries = json.load(f)
    else:
        start = time.perf_counter()
        entries = evaluate(configs["eval"], dirs["eval"])
        timings["eval"] = time.perf_counter() - start
    import jax

    if jax.process_index() == 0:
        print(results_table(entries))
        print("\nSample grids:")
        for e in entries:
            print(f"  {e['model']} {e['sampler']}-{e['steps']}: {e['grid']}")
        for stage, seconds in timings.items():
            print(f"{stage}: {seconds / 60:.1f} min")
        print(f"total (this invocation): {(time.perf_counter() - pipeline_start) / 60:.1f} min")
    return entries


def main(argv: list[str]) -> None:
    del argv
    from hd.logs import quiet_library_logs
    quiet_library_logs()
    parallel.run_processes(
        lambda: run_pipeline(_CONFIG.value, _WORKDIR.value, _PROFILE.value, tuple(_SET.value)), _DISTRIBUTED)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
