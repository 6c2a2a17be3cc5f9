"""Entry point: python -m hd.main --config=configs/X.py:VARIANT --workdir=DIR [--config.a.b=v ...]"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from hd.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/toy2d.py:teacher.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of this stage (checkpoints, logs, samples).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
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
