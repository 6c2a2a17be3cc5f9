"""One flag convention for the entry points (hd.main, hd.pipeline, hd.ablation, hd.bench, hd.compile_check).

Each defines its flags in its `if __name__ == "__main__":` block, never at import (tests and notebooks import
the modules and define no flag), taking the shared ones from here:
- `--config`: a config file and variant (`config_variant_flag`: FILE.py:VARIANT plus `--config.a.b=v`
  overrides) or, for the runners that take every stage's variant from `--profile`, the file alone
  (`pipeline_flags`, with `--workdir`, `--profile` and `--set KEY=VALUE`, parsed as `--config.KEY=VALUE` is);
- `--workdir`;
- `--coordinator_address`, `--num_processes`, `--process_id` (every entry point: `start` defines them).
`start` then runs the entry point's body through `parallel.run_processes` in every process (the
multi-process runtime up before anything touches a device, and down together at the end).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from hd import parallel
from hd.logs import quiet_library_logs

def config_variant_flag(help_text: str = "Config file and variant, e.g. configs/toy2d.py:teacher."):
    """--config=FILE.py:VARIANT (and --config.a.b=v overrides); `.value` is the ConfigDict."""
    return config_flags.DEFINE_config_file("config", None, help_text)


def workdir_flag(help_text: str = "Work directory of this stage (checkpoints, logs, samples)."):
    return flags.DEFINE_string("workdir", None, help_text)


def pipeline_flags(profiles: Sequence[str]) -> dict[str, Any]:
    """The flags of the runners that run every stage from one config file (hd.pipeline, hd.ablation):
    {config, workdir, profile, set} flag holders; `profiles` names the sets of variants (the first is the
    default)."""
    return dict(
        config=flags.DEFINE_string("config", None, "Config file with per-stage variants, e.g. "
                                   "configs/fashion_mnist.py (no ':VARIANT': --profile picks them)."),
        workdir=workdir_flag("Pipeline work directory; each stage gets a sub-directory."),
        profile=flags.DEFINE_enum("profile", profiles[0], list(profiles), "Which set of variants to run."),
        set=flags.DEFINE_multi_string("set", [], "Override for every stage, KEY=VALUE (e.g. seed=1), parsed as "
                                      "--config.KEY=VALUE is."),
    )


def config_file_error(argv: Sequence[str], prog: str) -> str | None:
    """The error for a --config=FILE[:VARIANT] whose file does not exist (ml_collections would defer it to a
    vaguer one), None otherwise."""
    path = next((a.split("=", 1)[1].split(":", 1)[0] for a in argv[1:] if a.startswith("--config=")), None)
    if path is not None and not os.path.isfile(path):
        return f"{prog}: --config: config file {path} does not exist ({os.path.abspath(path)})"
    return None


def start(body: Callable[[], Any], prog: str, *, required: Sequence[str] = (), variant_config: bool = False
          ) -> None:
    """Defines the multi-process flags, marks `required` flags, parses the command line and runs `body` (which
    reads the flag holders) in every process through parallel.run_processes, library logs quieted.
    variant_config: --config is a config_variant_flag, whose missing file is named here (the runners that
    take the file alone name it themselves, with the files that do exist)."""
    distributed = parallel.define_distributed_flags()
    flags.mark_flags_as_required(list(required))
    # --help lists the main module's key flags: the shared ones are defined here and in hd.parallel.
    for module in ("hd.cli", "hd.parallel"):
        for flag in flags.FLAGS.get_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    error = config_file_error(sys.argv, prog) if variant_config else None
    if error:
        sys.exit(error)

    def main(argv: list[str]) -> None:
        del argv
        quiet_library_logs()
        parallel.run_processes(body, distributed)

    app.run(main)
