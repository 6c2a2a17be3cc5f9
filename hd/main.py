"""Entry point: python -m hd.main --config=configs/X.py:VARIANT --workdir=DIR [--config.a.b=v ...]

Several processes (one per host, or per accelerator): start the same command in each with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment), all pointing at one shared work directory. Under SLURM
(SLURM_NTASKS > 1) and on multi-worker Cloud TPU slices they may be left out: JAX detects them.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hd import parallel
from hd.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/toy2d.py:teacher.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of this stage (checkpoints, logs, samples).")
_DISTRIBUTED = parallel.define_distributed_flags()  # --coordinator_address, --num_processes, --process_id
flags.adopt_module_key_flags(parallel)  # listed by --help
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    parallel.run_processes(lambda: run(_CONFIG.value, _WORKDIR.value), _DISTRIBUTED)


def run(config, workdir: str) -> None:
    import jax

    if config.stage == "eval":
        from hd.config import validate
        from hd.eval.evaluator import evaluate, results_table

        validate(config, jax.device_count())
        table = results_table(evaluate(config, workdir))
        if jax.process_index() == 0:
            print(table)
        return
    from hd.train.loop import train  # after flag parsing: keeps --help fast

    train(config, workdir, command=sys.argv)  # the command line, quoted in errors that say how to resume


if __name__ == "__main__":
    path = next((a.split("=", 1)[1].split(":", 1)[0] for a in sys.argv[1:] if a.startswith("--config=")), None)
    if path is not None and not os.path.isfile(path):  # else ml_collections defers it to a vaguer error
        sys.exit(f"hd.main: --config: config file {path} does not exist ({os.path.abspath(path)})")
    app.run(main)
