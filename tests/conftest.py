"""Shared helpers for the tests: configs with overrides, `python -m hd.main` in a subprocess, the
8-device sharding/checkpoint check (run once per session), and file-tree snapshots."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for this session's processes (pytest itself and the `python -m hd.main`
# and sharding subprocesses, which inherit the variable): the same toy step is then compiled once, not once per
# run. Set before jax is imported; a cache the caller chose is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="hd-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def load_config(name: str, variant: str, overrides: dict | None = None):
    """configs/<name>.py:<variant> with dotted-key overrides, as `--config.a.b=v` would set them."""
    spec = importlib.util.spec_from_file_location(f"_test_configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from hd.config import set_values

    return set_values(module.get_config(variant), overrides or {})


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def main_command(config_arg: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "hd.main", f"--config={REPO / 'configs' / config_arg}", f"--workdir={workdir}",
            *overrides]


def run_main(config_arg: str, workdir, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(config_arg, workdir, *overrides), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def tree_snapshot(root) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and directory under root ({} if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def sharding_results(tmp_path_factory) -> dict:
    """Runs tests/sharding_check.py once on 8 simulated CPU devices (XLA_FLAGS must be set before jax is
    imported, hence the subprocess) and returns what it measured."""
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sharding_check.py"), str(out)], cwd=REPO,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"sharding_check.py failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


# The toy run that checkpoint tests interrupt and compare against: long enough to kill mid-way (tens of
# milliseconds per step), checkpoints every 25 steps, no learning-rate warm-up (every step moves the weights;
# test_nonfinite.py uses the same step, so with the persistent cache it is compiled once per session).
TOY_RUN = {"num_steps": 150, "checkpoint_every": 25, "log_every": 10, "optimizer.warmup_steps": 0}


def toy_overrides(values: dict = TOY_RUN) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def load_checkpoint(workdir, config, data_shape=(2,), step=None):
    """(TrainState, data-iterator state) of a work directory's checkpoint (newest unless `step`)."""
    import jax

    from hd.checkpoint import Checkpointer
    from hd.train.stages import build_stage

    stage = build_stage(config, data_shape)
    abstract = jax.eval_shape(stage.init_state, jax.random.PRNGKey(0))
    checkpointer = Checkpointer(str(workdir), keep=1000)
    try:
        return checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()


def complete_checkpoints(workdir) -> list[int]:
    """Steps whose checkpoint directory is complete (orbax writes commit_success.txt last)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """An uninterrupted in-process toy2d:tiny teacher run of TOY_RUN: (workdir, returned metrics)."""
    from hd.train.loop import train

    workdir = tmp_path_factory.mktemp("toy_run") / "work"
    metrics = train(load_config("toy2d", "tiny", TOY_RUN), str(workdir))
    return workdir, metrics
