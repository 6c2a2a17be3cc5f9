"""Entry point: python -m hd.main --config=configs/X.py:VARIANT --workdir=DIR [--config.a.b=v ...]"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/toy2d.py:teacher.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of this stage (checkpoints, logs, samples).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Orbax and the array store log every file they touch at INFO; keep their warnings and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/_src/", "/tensorstore/"))
        return record.levelno >= logging.WARNING or not noisy


def main(argv: list[str]) -> None:
    del argv
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config.stage == "eval":
        import jax

        from hd.config import validate
        from hd.eval.evaluator import evaluate, results_table

        validate(config, jax.device_count())
        print(results_table(evaluate(config, workdir)))
        return
    from hd.train.loop import train  # after flag parsing: keeps --help fast

    train(config, workdir)


if __name__ == "__main__":
    app.run(main)
