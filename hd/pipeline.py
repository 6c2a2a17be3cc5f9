"""The whole HD pipeline: teacher -> sketch -> refine -> evaluation, each stage in its own sub-directory of
the work directory, handing over through checkpoints. Rerunning skips finished stages and resumes an
interrupted one.

    python -m hd.pipeline --config=configs/fashion_mnist.py --workdir=runs/fmnist [--profile=tiny]
        [--set KEY=VALUE ...] [--rebuild_stale]

The config file supplies one variant per stage: `teacher`, `sketch`, `refine`, `eval` (profile 'default')
or `tiny`, `sketch_tiny`, `refine_tiny`, `eval_tiny` (profile 'tiny'). `--set KEY=VALUE` overrides a key in
every stage and is parsed exactly as `--config.KEY=VALUE` is by hd.main (ml_collections' parsers: an int
field takes an integer, a bool field true/false, a tuple field `(1, 2)`).

What each result was made from is recorded, so a rerun never reports or extends stale work:
- WORKDIR/pipeline.json records, for each stage, the checkpoint step of every stage it was built from (the
  sketch from the teacher; the refine stage from the teacher and the sketch). It is written before a stage
  starts training. A stage directory written by an older version of the pipeline has no record; it is taken
  to have been built from its sources' newest steps, with a log line saying so.
- WORKDIR/eval/sources.json, beside results.json, records the checkpoint step of every stage the evaluation
  scored (and what each was built from) and the evaluation config; every row of results.json names its
  `stage` and `checkpoint_step`. If any of it differs from the stages now on disk, the evaluation runs again;
  the superseded results are kept in WORKDIR/eval/superseded/<time>/.
- A stage whose source will have moved by the end of this run (e.g. `--set num_steps=300` after a finished
  run trains the teacher on from step 20 to 300, but the sketch was distilled from teacher step 20) would
  mix two sources if trained further. The pipeline refuses before training or writing anything, naming each
  such stage and the two steps. With --rebuild_stale it moves those stages (and every stage built from them)
  to WORKDIR/superseded/<stage>-<time>/ (nothing is deleted) and trains them again from the new sources.
  A stage already past its configured num_steps is not trained further (logged) and counts at its newest step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import jax
import ml_collections
from absl import flags, logging
from jax.experimental import multihost_utils

from hd import cli
from hd.checkpoint import latest_step
from hd.config import apply_overrides
from hd.eval import evaluator
from hd.eval.evaluator import results_table, write_results
from hd.files import replace_json
from hd.train import loop

VARIANTS = {
    "default": {"teacher": "teacher", "sketch": "sketch", "refine": "refine", "eval": "eval"},
    "tiny": {"teacher": "tiny", "sketch": "sketch_tiny", "refine": "refine_tiny", "eval": "eval_tiny"},
    "quality": {"teacher": "quality", "sketch": "sketch_quality", "refine": "refine_quality", "eval": "eval_quality"},
}
TRAINED = ("teacher", "sketch", "refine")
PLAN_FILE = "pipeline.json"  # in WORKDIR: the source steps each stage was built from
SOURCES_FILE = "sources.json"  # beside results.json: the checkpoint steps the evaluation scored
SUPERSEDED = "superseded"


class StaleStageError(RuntimeError):
    """A stage was built from an older checkpoint of its teacher or sketch than the one this run ends with."""


def load_config_file(path: str):
    """The config module at `path` (a file path; hd.pipeline takes no ':VARIANT', --profile picks them)."""
    if not os.path.isfile(path):
        base = path.split(":", 1)[0]
        if ":" in path and os.path.isfile(base):
            hint = f"; hd.pipeline and hd.ablation take the file alone ({base}): --profile picks each stage's variant"
        else:
            folder = os.path.dirname(os.path.abspath(base))
            present = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
            hint = f"; {folder} has {present}" if present else f"; the directory {folder} does not exist either"
        raise FileNotFoundError(f"config file {path} does not exist (looked for {os.path.abspath(path)}, relative "
                                f"paths are read from {os.getcwd()}){hint}")
    spec = importlib.util.spec_from_file_location("hd_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for stage in TRAINED:
        configs[stage].eval.feature_dir = dirs["eval"]
    configs["eval"].eval.teacher_workdir = dirs["teacher"]
    configs["eval"].eval.students = f"sketch={dirs['sketch']},refine={dirs['refine']}"
    return configs


def stage_dirs(workdir: str) -> dict[str, str]:
    return {stage: os.path.join(os.path.abspath(workdir), stage) for stage in ("teacher", "sketch", "refine", "eval")}


def finished(workdir: str, num_steps: int) -> bool:
    return latest_step(workdir) == num_steps


def stage_sources(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, tuple[str, ...]]:
    """The earlier stages whose checkpoints each trained stage reads."""
    return {"teacher": (),
            "sketch": ("teacher",) if configs["sketch"].sketch.target == "teacher" else (),
            "refine": ("teacher", "sketch") if configs["refine"].refine.generator_init == "sketch" else ("teacher",)}


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _sync(name: str) -> None:
    if jax.process_count() > 1:  # the work directory is shared: others wait for process 0's moves and writes
        multihost_utils.sync_global_devices(name)


def _final_steps(configs: dict, dirs: dict) -> tuple[dict[str, int | None], dict[str, int]]:
    """(newest step on disk, step at the end of this run) of each trained stage."""
    latest = {stage: latest_step(dirs[stage]) for stage in TRAINED}
    final = {stage: configs[stage].num_steps if latest[stage] is None else max(latest[stage], configs[stage].num_steps)
             for stage in TRAINED}
    return latest, final


def stale_stages(configs: dict[str, ml_collections.ConfigDict], dirs: dict[str, str], plan: dict
                 ) -> list[tuple[str, str]]:
    """(stage, reason) for every trained stage that holds checkpoints built from other source checkpoints than
    the ones this run ends with; a stage built from a stale stage is stale too (it will be rebuilt)."""
    latest, final = _final_steps(configs, dirs)
    sources = stage_sources(configs)
    stale = []
    for stage in TRAINED:
        if latest[stage] is None:
            continue
        # A directory from before records was built from its sources' newest steps (the pipeline trains a stage
        # only once its sources are finished).
        built_from = plan.get(stage, {}).get("built_from") or {source: latest[source] for source in sources[stage]}
        reasons = []
        for source in sources[stage]:
            if source in dict(stale):
                reasons.append(f"{source} step {built_from.get(source)}, but {source} is trained again")
            elif latest[source] is None:
                reasons.append(f"{source} step {built_from.get(source)}, but {source} has no checkpoints now and "
                               "is trained from scratch")
            elif built_from.get(source) != final[source]:
                reasons.append(f"{source} step {built_from.get(source)}, but {source} will be at step "
                               f"{final[source]}")
        if reasons:
            stale.append((stage, f"{stage} ({dirs[stage]}, at step {latest[stage]}) was built from "
                                 + "; ".join(reasons)))
    return stale


def _supersede(path: str, workdir: str, stamp: str) -> str:
    target = os.path.join(os.path.abspath(workdir), SUPERSEDED, f"{os.path.basename(path)}-{stamp}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(path, target)  # same file system: a move, never a copy-and-delete
    return target


def _evaluation_record(configs, dirs, plan: dict) -> dict:
    scored = {stage: {"workdir": dirs[stage], "step": latest_step(dirs[stage]),
                      "built_from": plan.get(stage, {}).get("built_from", {})} for stage in TRAINED}
    # The keys that change what the evaluation computes (not e.g. log_every or num_steps, which --set also sets).
    config = json.loads(configs["eval"].to_json_best_effort())
    return {"stages": scored, "eval_config": {k: config[k] for k in ("seed", "data", "model", "eval")}}


def _evaluation_changes(previous: dict | None, current: dict) -> str:
    """Why stored results do not describe the current stages ('' when they do)."""
    if previous is None:
        return f"no {SOURCES_FILE} says which checkpoints results.json scored"
    changes = []
    for stage, now in current["stages"].items():
        before = previous.get("stages", {}).get(stage, {})
        if before.get("step") != now["step"]:
            changes.append(f"{stage} step {before.get('step')} -> {now['step']}")
        elif before.get("built_from") != now["built_from"] or before.get("workdir") != now["workdir"]:
            changes.append(f"{stage} was rebuilt ({before.get('built_from')} -> {now['built_from']})")
    if previous.get("eval_config") != current["eval_config"]:
        changes.append("the evaluation config changed")
    return ", ".join(changes)


def _describe(record: dict) -> str:
    return ", ".join(f"{stage} step {s['step']}" for stage, s in record["stages"].items())


def run_pipeline(config_path: str, workdir: str, profile: str = "default", overrides: tuple[str, ...] = (),
                 rebuild_stale: bool = False) -> list[dict]:
    configs = stage_configs(config_path, workdir, profile, overrides)
    dirs = stage_dirs(workdir)
    plan_path = os.path.join(os.path.abspath(workdir), PLAN_FILE)
    plan = _read_json(plan_path) or {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Before anything trains or writes: stages built from other source steps than this run ends with.
    stale = stale_stages(configs, dirs, plan)
    if stale and not rebuild_stale:
        raise StaleStageError(
            "these stages were built from an older teacher or sketch than this run ends with; training them "
            "further would mix two sources:\n  " + "\n  ".join(reason for _, reason in stale) + "\nRerun with "
            f"--rebuild_stale to move {', '.join(s for s, _ in stale)} to {os.path.join(workdir, SUPERSEDED)}/ "
            "and train them again from the new checkpoints, or use a new --workdir. Nothing was trained or written.")
    for stage, reason in stale:
        if jax.process_index() == 0:
            moved = _supersede(dirs[stage], workdir, stamp)
            plan.pop(stage, None)
            replace_json(plan_path, plan)
            logging.warning("%s; moved it to %s, training it again", reason, moved)
    _sync("pipeline_superseded")


    sources = stage_sources(configs)
    timings = {}
    pipeline_start = time.perf_counter()
    for stage in TRAINED:
        latest, num_steps = latest_step(dirs[stage]), configs[stage].num_steps
        # What the stage is built from, recorded before it trains: a new stage starts from its sources' newest
        # steps (they are finished by now); one from before records was built from them too (checked above).
        if latest is None or stage not in plan:
            built_from = {source: latest_step(dirs[source]) for source in sources[stage]}
            if latest is not None and built_from:
                logging.warning("%s: no record of what it was built from (%s); taking its sources' newest steps "
                                "%s", stage, plan_path, built_from)
            plan[stage] = {"built_from": built_from}
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(plan_path), exist_ok=True)
                replace_json(plan_path, plan)
        if latest is not None and latest >= num_steps:
            if latest == num_steps:
                logging.info("%s: finished earlier (%s), skipping", stage, dirs[stage])
            else:
                logging.warning("%s: at step %d, past num_steps=%d (%s); not trained further", stage, latest,
                                num_steps, dirs[stage])
            continue
        logging.info("=== stage %s -> %s (built from %s)", stage, dirs[stage], plan[stage]["built_from"] or "data")
        start = time.perf_counter()
        loop.train(configs[stage], dirs[stage])
        timings[stage] = time.perf_counter() - start

    results_path = os.path.join(dirs["eval"], "results.json")
    sources_path = os.path.join(dirs["eval"], SOURCES_FILE)
    record = _evaluation_record(configs, dirs, plan)
    changes = _evaluation_changes(_read_json(sources_path), record) if os.path.exists(results_path) else "no results"
    if not changes:
        logging.info("eval: finished earlier (%s; scored %s), skipping", results_path, _describe(record))
        entries = _read_json(results_path)
    else:
        if os.path.exists(results_path):
            logging.warning("eval: %s is out of date (%s); evaluating again", results_path, changes)
            if jax.process_index() == 0:  # the old table stays readable, never overwritten
                kept = os.path.join(dirs["eval"], SUPERSEDED, stamp)
                os.makedirs(kept, exist_ok=True)
                for name in ("results.json", "results.md", SOURCES_FILE):
                    if os.path.exists(os.path.join(dirs["eval"], name)):
                        shutil.copy2(os.path.join(dirs["eval"], name), kept)
        start = time.perf_counter()
        entries = evaluator.evaluate(configs["eval"], dirs["eval"])
        timings["eval"] = time.perf_counter() - start
        # Each row names the stage and checkpoint step it scored; sources.json goes last, so a crash before it
        # leaves results that the next run evaluates again.
        by_dir = {s["workdir"]: (stage, s["step"]) for stage, s in record["stages"].items()}
        for e in entries:
            stage, step = by_dir.get(e["workdir"], (None, None))
            e["stage"] = stage
            if e.setdefault("checkpoint_step", step) != step:  # the evaluator's own record of what it read wins
                logging.warning("eval: %s row %s scored step %s, not the newest step %s", stage, e["model"],
                                e["checkpoint_step"], step)
        if _evaluation_changes(record, _evaluation_record(configs, dirs, plan)):
            raise RuntimeError(f"a stage in {workdir} changed during the evaluation (another process writing?): "
                               "rerun the pipeline")
        if jax.process_index() == 0:
            write_results(entries, dirs["eval"])
            replace_json(sources_path, record)

    if jax.process_index() == 0:
        print(results_table(entries))
        print(f"\nScored checkpoints: {_describe(record)}"
              + (" (results from an earlier invocation)" if not changes else ""))
        print("\nSample grids:")
        for e in entries:
            print(f"  {e['model']} {e['sampler']}-{e['steps']}: {e['grid']}")
        for stage, seconds in timings.items():
            print(f"{stage}: {seconds / 60:.1f} min")
        print(f"total (this invocation): {(time.perf_counter() - pipeline_start) / 60:.1f} min")
    return entries


if __name__ == "__main__":  # flags only here: importing this module (tests, hd.ablation) defines none
    _FLAGS = cli.pipeline_flags(tuple(VARIANTS))
    _REBUILD = flags.DEFINE_bool("rebuild_stale", False, "Move stages built from an older teacher or sketch to "
                                 "WORKDIR/superseded/ and train them again, instead of stopping with an error.")
    cli.start(lambda: run_pipeline(_FLAGS["config"].value, _FLAGS["workdir"].value, _FLAGS["profile"].value,
                                   tuple(_FLAGS["set"].value), _REBUILD.value), "hd.pipeline",
              required=["config", "workdir"])
