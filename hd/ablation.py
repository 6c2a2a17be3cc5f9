"""The ablation of docs/method.md at small scale, every row with the same budget and the same evaluation:

    teacher at several step counts | sketch only | teacher -> DMD + AWD (no sketch) |
    sketch -> DMD (no GAN) | sketch -> DMD + GAP head | sketch -> DMD + AWD (full HD)

    python -m hd.ablation --config=configs/fashion_mnist.py --workdir=runs/fmnist [--profile=tiny] [--seeds=3]

It reuses the pipeline's teacher and sketch in WORKDIR (running them first if needed), trains each refine
variant in WORKDIR/ablation/<row>, and writes WORKDIR/ablation/ablation.{json,md}.

With --seeds=S > 1, every row (the teacher rows included) is rerun at seeds 0..S-1, each seed a whole
ablation as `--set seed=s` makes it: seed 0 in WORKDIR itself (reusing the pipeline's run there), seed s in
WORKDIR/seed_s/. The seed sets the teacher's, sketch's and refine rows' initialisation and data order and the
evaluation's noise. Each seed's table stays in its own ablation/eval/results.{json,md}; WORKDIR/ablation/
ablation.{json,md} then gives, per row and metric, the mean and the sample standard deviation (ddof=1) over
seeds, with every seed's value in the JSON. Every seed is scored with WORKDIR's cached feature classifier.
"""

from __future__ import annotations

import copy
import os

import jax
import numpy as np
from absl import flags, logging

from hd import cli, visualize
from hd.eval import evaluator
from hd.eval.curves import read_scalar_curves
from hd.eval.evaluator import Row, results_table, write_results
from hd.files import replace_json, replace_text
from hd.pipeline import VARIANTS, finished, stage_configs, stage_dirs
from hd.train import loop

# Metrics averaged over seeds (the NFE is the same at every seed).
SEED_METRICS = ("fd", "precision", "recall", "class_consistency", "seconds_per_image")

# The teacher from one step to the many-step result a one-step generator is measured against.
TEACHER_ROWS = {"default": (("euler", 1), ("euler", 4), ("euler", 16), ("euler", 64), ("heun", 8)),
                "tiny": (("euler", 1), ("euler", 4))}
TEACHER_ROWS["quality"] = TEACHER_ROWS["default"]
# Refine rows: name -> overrides of the refine config.
REFINE_ROWS = {
    "teacher_dmd_awd": {"generator_init": "teacher", "gan_head": "awd"},  # DMD + AWD from the teacher, no sketch
    "sketch_dmd": {"gan_head": "none"},
    "sketch_dmd_gap": {"gan_head": "gap"},
    "sketch_dmd_awd": {"gan_head": "awd"},
}


def run_ablation(config_path: str, workdir: str, profile: str = "default", overrides: tuple[str, ...] = (),
                 seeds: int = 1) -> list[dict]:
    """The ablation's table: one entry per row (seeds == 1), or the per-row summaries over seeds 0..seeds-1."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds={seeds!r} must be a positive integer (1 = the single-seed ablation)")
    if seeds == 1:
        return _run_one_seed(config_path, workdir, profile, overrides)
    if any(o.partition("=")[0].strip() == "seed" for o in overrides):
        raise ValueError("--seeds sets each run's seed (0..seeds-1): drop --set seed=... or use --seeds=1")
    stage_configs(config_path, workdir, profile, overrides)  # a bad config or --set fails before anything runs
    feature_workdir = stage_dirs(workdir)["eval"]  # one classifier scores every seed
    per_seed = []
    for seed in range(seeds):
        seed_dir = seed_workdir(workdir, seed)
        logging.info("=== ablation seed %d/%d -> %s", seed + 1, seeds, seed_dir)
        per_seed.append(_run_one_seed(config_path, seed_dir, profile, (*overrides, f"seed={seed}"),
                                      feature_workdir=feature_workdir, write=False))
    summary = aggregate_seeds(per_seed, list(range(seeds)))
    if jax.process_index() == 0:
        write_seed_summary(summary, os.path.join(os.path.abspath(workdir), "ablation"))
    print(seed_table(summary))
    return summary


def seed_workdir(workdir: str, seed: int) -> str:
    """Where seed `seed` of a multi-seed ablation runs: WORKDIR itself for seed 0 (the pipeline's run)."""
    return os.path.abspath(workdir) if seed == 0 else os.path.join(os.path.abspath(workdir), f"seed_{seed}")


def aggregate_seeds(per_seed: list[list[dict]], seeds: list[int]) -> list[dict]:
    """Per row (model, sampler, steps, in the first seed's order): mean, sample standard deviation (ddof=1;
    None for one seed) and the per-seed values of each of SEED_METRICS. A metric that is None at any seed
    (e.g. class-consistency without a classifier) summarises to None. Every seed must have the same rows."""
    if len(per_seed) != len(seeds) or not per_seed:
        raise ValueError(f"{len(per_seed)} result lists for seeds {seeds}: one list per seed expected")
    key = lambda e: (e["model"], e["sampler"], e["steps"])
    order = [key(e) for e in per_seed[0]]
    by_seed = []
    for seed, entries in zip(seeds, per_seed):
        rows = {key(e): e for e in entries}
        if sorted(rows) != sorted(order) or len(rows) != len(entries):
            raise ValueError(f"seed {seed} scored rows {sorted(rows)}, seed {seeds[0]} scored {sorted(order)}: "
                             "every seed must score the same rows once")
        by_seed.append(rows)
    summary = []
    for row in order:
        entries = [rows[row] for rows in by_seed]
        out = dict(model=row[0], sampler=row[1], steps=row[2], nfe=entries[0]["nfe"], seeds=list(seeds),
                   feature_net=entries[0].get("feature_net"),
                   feature_net_test_accuracy=entries[0].get("feature_net_test_accuracy"),
                   n_samples=entries[0].get("n_samples"), workdirs=[e.get("workdir") for e in entries])
        for metric in SEED_METRICS:
            values = [e.get(metric) for e in entries]
            if any(v is None for v in values):
                out[metric] = {"mean": None, "std": None, "values": values}
                continue
            array = np.asarray(values, np.float64)
            out[metric] = {"mean": float(array.mean()),
                           "std": float(array.std(ddof=1)) if len(array) > 1 else None,
                           "values": [float(v) for v in array]}
        summary.append(out)
    return summary


def seed_table(summary: list[dict]) -> str:
    """The markdown table of `aggregate_seeds`' output: mean ± std (ddof=1) per metric."""
    def cell(stat: dict, scale: float = 1.0, spec: str = ".3f") -> str:
        if stat["mean"] is None:
            return "–"
        std = "" if stat["std"] is None else f" ± {format(scale * stat['std'], spec)}"
        return format(scale * stat["mean"], spec) + std

    lines = ["| model | sampler | steps | NFE | FD | precision | recall | class-consistency | ms/image |",
             "|" + "---|" * 9]
    for e in summary:
        lines.append(f"| {e['model']} | {e['sampler']} | {e['steps']} | {e['nfe']} | {cell(e['fd'])} | "
                     f"{cell(e['precision'])} | {cell(e['recall'])} | {cell(e['class_consistency'])} | "
                     f"{cell(e['seconds_per_image'], 1e3)} |")
    return "\n".join(lines)


def write_seed_summary(summary: list[dict], directory: str, name: str = "ablation") -> None:
    """NAME.json (every field, per-seed values included) and NAME.md (a note on seeds and features, the table)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    replace_json(path + ".json", summary)
    first = summary[0]
    accuracy = first["feature_net_test_accuracy"]
    note = (f"Mean ± sample standard deviation (ddof=1) over seeds {', '.join(map(str, first['seeds']))}; "
            f"{first['n_samples']} samples per row and seed; features: {first['feature_net']}"
            + (f" (test accuracy {accuracy:.4f})" if accuracy else "") + ".\n\n")
    replace_text(path + ".md", note + seed_table(summary) + "\n")


def write_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], directory: str) -> None:
    """The refine rows' in-training scores ({row: read_scalar_curves(row's workdir)}) as curves.json (every tag),
    curves.md (FD and recall per scored step, a column per row) and curves.png (FD against the refine step)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "curves")
    replace_json(path + ".json", curves)
    rows = [name for name in curves if curves[name].get("eval/fd")]
    if not rows:
        return
    steps = sorted({s for name in rows for s, _ in curves[name]["eval/fd"]})
    lookup = {(name, tag): dict(curves[name].get(tag, [])) for name in rows for tag in ("eval/fd", "eval/recall")}
    cell = lambda name, tag, s: "–" if s not in lookup[name, tag] else f"{lookup[name, tag][s]:.3f}"
    lines = ["One-step samples of each refine row scored during training (config.eval_every): FD / recall.", "",
             "| refine step | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 1)]
    lines += [f"| {s} | " + " | ".join(f"{cell(n, 'eval/fd', s)} / {cell(n, 'eval/recall', s)}" for n in rows) + " |"
              for s in steps]
    replace_text(path + ".md", "\n".join(lines) + "\n")
    chart = visualize.line_chart({name: curves[name]["eval/fd"] for name in rows}, title="one-step FD during refine",
                                 x_label="refine step", y_label="FD")
    visualize.save_png(chart, path + ".png")


def _run_one_seed(config_path: str, workdir: str, profile: str, overrides: tuple[str, ...],
                  feature_workdir: str | None = None, write: bool = True) -> list[dict]:
    """One ablation in `workdir`: trains what is missing, scores every row; writes ablation.{json,md} if `write`."""

    configs = stage_configs(config_path, workdir, profile, overrides)
    dirs = stage_dirs(workdir)
    for stage in ("teacher", "sketch"):
        if not finished(dirs[stage], configs[stage].num_steps):
            loop.train(configs[stage], dirs[stage])

    out = os.path.join(os.path.abspath(workdir), "ablation")
    rows = [Row("teacher", dirs["teacher"], sampler, n) for sampler, n in TEACHER_ROWS[profile]]
    rows.append(Row("sketch_only", dirs["sketch"], "mean_flow", 1))
    for name, changes in REFINE_ROWS.items():
        config = copy.deepcopy(configs["refine"])
        for key, value in changes.items():
            config.refine[key] = value
        # The full-HD row is the pipeline's own refine stage (same config): reuse it.
        row_dir = dirs["refine"] if name == "sketch_dmd_awd" else os.path.join(out, name)
        if not finished(row_dir, config.num_steps):
            logging.info("=== ablation row %s -> %s", name, row_dir)
            loop.train(config, row_dir)
        rows.append(Row(name, row_dir, "mean_flow", 1))

    if configs["refine"].eval_every and jax.process_index() == 0:
        write_curves({r.name: read_scalar_curves(r.workdir) for r in rows if r.name in REFINE_ROWS}, out)

    # The pipeline's evaluation directory holds the classifier: scored with the same features, not retrained.
    entries = evaluator.evaluate(configs["eval"], os.path.join(out, "eval"), rows,
                       feature_workdir=feature_workdir or dirs["eval"])
    if write and jax.process_index() == 0:
        write_results(entries, out, "ablation")
    print(results_table(entries))
    return entries


if __name__ == "__main__":  # flags only here: --config, --workdir, --profile and --set are hd.pipeline's
    _FLAGS = cli.pipeline_flags(tuple(VARIANTS))
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Run every row at seeds 0..seeds-1 (seed s in WORKDIR/seed_s, seed 0 "
                                  "in WORKDIR) and report mean and standard deviation over seeds.")
    cli.start(lambda: run_ablation(_FLAGS["config"].value, _FLAGS["workdir"].value, _FLAGS["profile"].value,
                                   tuple(_FLAGS["set"].value), _SEEDS.value), "hd.ablation",
              required=["config", "workdir"])
