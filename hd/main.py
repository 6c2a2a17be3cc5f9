"""Entry point: python -m hd.main --config=configs/X.py:VARIANT --workdir=DIR [--config.a.b=v ...]

Several processes (one per host, or per accelerator): start the same command in each with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment), all pointing at one shared work directory. Under SLURM
(SLURM_NTASKS > 1) and on multi-worker Cloud TPU slices they may be left out: JAX detects them.
"""

from __future__ import annotations

import sys

import jax

from hd import cli
from hd.config import validate
from hd.eval.evaluator import evaluate, results_table
from hd.train.loop import train


def run(config, workdir: str) -> None:
    if config.stage == "eval":
        validate(config, jax.device_count())
        table = results_table(evaluate(config, workdir))
        if jax.process_index() == 0:
            print(table)
        return
    train(config, workdir, command=sys.argv)  # the command line, quoted in errors that say how to resume


if __name__ == "__main__":  # flags only here: importing this module defines none
    _CONFIG = cli.config_variant_flag()
    _WORKDIR = cli.workdir_flag()
    cli.start(lambda: run(_CONFIG.value, _WORKDIR.value), "hd.main", required=["config", "workdir"],
              variant_config=True)
