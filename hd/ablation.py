"""The ablation of docs/method.md at small scale, every row with the same budget and the same evaluation:

    teacher at several step counts | sketch only | teacher -> DMD + AWD (no sketch) |
    sketch -> DMD (no GAN) | sketch -> DMD + GAP head | sketch -> DMD + AWD (full HD)

    python -m hd.ablation --config=configs/fashion_mnist.py --workdir=runs/fmnist [--profile=tiny]

It reuses the pipeline's teacher and sketch in WORKDIR (running them first if needed), trains each refine
variant in WORKDIR/ablation/<row>, and writes WORKDIR/ablation/ablation.{json,md}.
"""

from __future__ import annotations

import copy
import os

from absl import app, flags, logging

# The pipeline's flags (--config, --workdir, --profile, --set) mean the same here.
from hd.pipeline import finished, stage_configs, stage_dirs

# The teacher from one step to the many-step result a one-step generator is measured against.
TEACHER_ROWS = {"default": (("euler", 1), ("euler", 4), ("euler", 16), ("euler", 64), ("heun", 8)),
                "tiny": (("euler", 1), ("euler", 4))}
# Refine rows: name -> overrides of the refine config.
REFINE_ROWS = {
    "teacher_dmd_awd": {"generator_init": "teacher", "gan_head": "awd"},  # DMD + AWD from the teacher, no sketch
    "sketch_dmd": {"gan_head": "none"},
    "sketch_dmd_gap": {"gan_head": "gap"},
    "sketch_dmd_awd": {"gan_head": "awd"},
}


def run_ablation(config_path: str, workdir: str, profile: str = "default", overrides: tuple[str, ...] = ()
                 ) -> list[dict]:
    import jax

    from hd.eval.evaluator import Row, evaluate, results_table, write_results
    from hd.train.loop import train

    configs = stage_configs(config_path, workdir, profile, overrides)
    dirs = stage_dirs(workdir)
    for stage in ("teacher", "sketch"):
        if not finished(dirs[stage], configs[stage].num_steps):
            train(configs[stage], dirs[stage])

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
            train(config, row_dir)
        rows.append(Row(name, row_dir, "mean_flow", 1))

    # The pipeline's evaluation directory holds the classifier: scored with the same features, not retrained.
    entries = evaluate(configs["eval"], os.path.join(out, "eval"), rows, feature_workdir=dirs["eval"])
    if jax.process_index() == 0:
        write_results(entries, out, "ablation")
    print(results_table(entries))
    return entries


def main(argv: list[str]) -> None:
    del argv
    from hd.logs import quiet_library_logs
    quiet_library_logs()
    f = flags.FLAGS
    run_ablation(f.config, f.workdir, f.profile, tuple(f.set))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
