"""Two processes of `python -m hd.main` on this machine, as on two hosts: jax.distributed over localhost
(--coordinator_address/--num_processes/--process_id), gloo CPU collectives, one CPU device per process, one
shared work directory. They train toy2d:tiny with the parameters FSDP-sharded across the two processes (mesh
data=1 x fsdp=2: every kernel is split between the processes, every batch too), so the checkpoints, the
parameter overview, the sampler and the metrics all handle arrays that no single process holds.

Reference: one process with two simulated CPU devices and the same mesh. Same program, same device layout, same
batches (each process reads its own rows of every batch; parallel.global_batch assembles them), and an
all-reduce over two operands is exact whatever the order (a + b == b + a in floating point), so the final
checkpoints must be equal bit for bit; measured: they are. A misplaced batch shard, a missing all-reduce or a
checkpoint that lost one process's shards changes them at the 1e-3 level (the size of one Adam step).

Not used: JAX_SHARE_BINARY_BETWEEN_HOSTS (process 0 compiles, process 1 waits for the binary). With the session's
persistent compilation cache, which the reference process writes meanwhile, process 0 can hit the cache where
process 1 missed it; process 1 then waits for a binary that never comes (seen here: a deadlock).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest

from conftest import (REPO, complete_checkpoints, load_checkpoint, load_config, main_command, subprocess_env,
                      toy_overrides)

MESH = {"mesh.data": 1, "mesh.fsdp": 2}
RUN = {"num_steps": 20, "checkpoint_every": 10, "log_every": 5, "optimizer.warmup_steps": 0, **MESH}
ITEMS = {"params", "ema_params", "opt_state", "counters", "data"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(workdir: Path, logs: Path, values: dict) -> list[subprocess.Popen]:
    port = free_port()
    env = subprocess_env()
    procs = []
    for i in range(2):
        with open(logs / f"process{i}.log", "w") as log:
            procs.append(subprocess.Popen(
                main_command("toy2d.py:tiny", workdir, *toy_overrides(values),
                             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log))
    return procs


def start_reference(workdir: Path, log_path: Path, values: dict) -> subprocess.Popen:
    """One process, two simulated CPU devices, the same mesh."""
    with open(log_path, "w") as log:
        return subprocess.Popen(main_command("toy2d.py:tiny", workdir, *toy_overrides(values)), cwd=REPO,
                                env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                                stdout=subprocess.DEVNULL, stderr=log)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def tail(path: Path) -> str:
    return path.read_text()[-3000:]


def test_two_processes_train_like_one(tmp_path, record_property):
    two, one = tmp_path / "two", tmp_path / "one"
    config = load_config("toy2d", "tiny", RUN)
    # The reference runs beside the pair (3 processes on 2 cores): the wall time below is an upper bound.
    start = time.perf_counter()
    reference = start_reference(one, tmp_path / "reference.log", RUN)
    procs = start_two(two, tmp_path, RUN)
    codes = wait_all(procs, timeout=300)  # measured 90-100 s on the 2 cores shared with other jobs (load 6-10)
    wall = time.perf_counter() - start
    record_property("two_process_wall_s", round(wall, 1))
    print(f"\n2-process toy2d:tiny run ({RUN['num_steps']} steps, beside the 1-process reference): {wall:.1f} s")
    assert wait_all([reference], timeout=120) == [0], tail(tmp_path / "reference.log")
    assert codes == [0, 0], [tail(tmp_path / f"process{i}.log") for i in range(2)]

    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    for i, log in enumerate(logs):
        assert f"process {i} of 2: 1 local of 2 cpu devices (jax.distributed on)" in log
    # Process 0 alone writes events, config and samples (clu names the events file after the writer's pid).
    events = sorted(p.name for p in two.glob("events.out.tfevents.*"))
    assert len(events) == 1 and f".{procs[0].pid}." in events[0], events
    assert (two / "config.json").read_text() == (one / "config.json").read_text()
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step_0000020.png"]
    # Both checkpoints complete, each array item written by both processes (one shard each).
    assert complete_checkpoints(two) == [10, 20]
    for step in (10, 20):
        directory = two / "checkpoints" / str(step)
        assert ITEMS <= {p.name for p in directory.iterdir()}
        assert sorted(os.listdir(directory / "params" / "array_metadatas")) == ["process_0", "process_1"]

    state, data_state = load_checkpoint(two, config)
    expected, expected_data = load_checkpoint(one, config)
    assert int(state.step) == RUN["num_steps"] and data_state == expected_data
    chex.assert_trees_all_equal(state, expected)


# Each process counts steps at its own pace (process 1 at half the speed, as if its host were slower) and asks
# parallel.PreemptionNotice after every step, as hd.train.loop does. Process 1 alone gets SIGTERM.
_PREEMPTION_SCRIPT = """
import sys, time
from pathlib import Path
from hd import parallel

port, index, ready = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
parallel.initialize_distributed(f"localhost:{port}", 2, index)
with parallel.PreemptionNotice() as notice:
    assert notice.synced
    for step in range(1, 3001):
        time.sleep(0.01 * (1 + index))
        if step == 20:
            ready.joinpath(str(index)).touch()
        if notice.reached(step):
            print(f"stopped at step {step}", flush=True)
            break
    else:
        print("never stopped", flush=True)
parallel.shutdown_distributed()
sys.exit(143)
"""


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    """JAX's preemption sync manager (what hd.train.loop asks after every step when several processes run):
    SIGTERM to one process makes both answer True at the same step, a step neither had passed when the notice
    came, so both save the same checkpoint and exit (the saving and resuming are the loop's ordinary
    checkpoint code, covered by the test above and tests/test_checkpoint.py). A script, not hd.main: seconds
    instead of a minute."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", _PREEMPTION_SCRIPT, str(port), str(i), str(tmp_path)], cwd=REPO,
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / str(i)).exists() for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outputs]
    stopped = [int(re.search(r"stopped at step (\d+)", out).group(1)) for out, _ in outputs]
    assert stopped[0] == stopped[1] > 20, stopped


# --- start-up decisions and the one-process preemption flag (in-process, no runtime started) ---------------------

CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")


@pytest.fixture
def start_up(monkeypatch):
    """initialize_distributed with jax.distributed.initialize recorded instead of run; returns (env, calls)."""
    from hd import parallel

    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: False)
    return monkeypatch, calls


def test_start_up_contract(start_up):
    from hd import parallel

    env, calls = start_up
    assert parallel.initialize_distributed() is False and calls == []  # one process: nothing
    # Flags, else JAX_* variables; with all three JAX's cluster detection stays off (all local devices).
    assert parallel.initialize_distributed("h:1", 2, 1) is True
    env.setenv("JAX_COORDINATOR_ADDRESS", "e:2")
    env.setenv("JAX_NUM_PROCESSES", "4")
    env.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed() is True
    assert parallel.initialize_distributed(process_id=0) is True  # a flag beats the variable
    assert calls == [(("h:1", 2, 1), {"cluster_detection_method": "deactivate"}),
                     (("e:2", 4, 3), {"cluster_detection_method": "deactivate"}),
                     (("e:2", 4, 0), {"cluster_detection_method": "deactivate"})]
    calls.clear()
    env.setenv("JAX_NUM_PROCESSES", "1")  # one process, whatever else is set
    assert parallel.initialize_distributed() is False and calls == []
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.delenv(name)
    # SLURM: a batch script (no job step) runs once; an srun step of several tasks is left to JAX's detection.
    for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0").items():
        env.setenv(name, value)
    assert parallel.initialize_distributed() is False and calls == []
    env.setenv("SLURM_STEP_NODELIST", "node[1-4]")
    assert parallel.initialize_distributed() is True
    assert calls == [((None, None, None), {"cluster_detection_method": None})]
    env.setenv("SLURM_NTASKS", "1")
    assert parallel.detected_cluster() is None


def test_one_process_sigterm_flag():
    """Without jax.distributed: a Python SIGTERM handler inside the context, the previous one restored after."""
    from hd import parallel

    before = signal.getsignal(signal.SIGTERM)
    with parallel.PreemptionNotice() as notice:
        assert not notice.synced and not notice.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert notice.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before
