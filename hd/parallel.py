"""Multi-process start-up, device mesh, parameter sharding by regex rules, host-local batches as global arrays,
and the step at which every process agrees to checkpoint and stop when one of them is preempted."""

from __future__ import annotations

import os
import re
import signal
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of a multi-process job that `jax.distributed.initialize()` configures by itself
    (JAX's cluster detection): a SLURM job step started by srun with SLURM_NTASKS > 1 (the variables JAX's
    SLURM detection reads; the batch script itself, which runs once, has no SLURM_STEP_NODELIST), or a Cloud TPU
    slice with several workers (GCE metadata or GKE's TPU_WORKER_HOSTNAMES). None for a single process."""
    ntasks = _env_int("SLURM_NTASKS")
    slurm_step = all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
    if slurm_step and ntasks is not None and ntasks > 1:
        return "slurm", ntasks
    try:  # JAX's own TPU detection; running_in_cloud_tpu_vm is set when jax is imported on a TPU VM
        from jax._src import cloud_tpu_init, clusters  # local: private JAX modules, guarded by the except
    except ImportError:  # a JAX that moved them: TPU pods then need the explicit flags
        return None
    if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return None
    for env in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
        try:
            if env.is_env_present():
                count = env.get_process_count()
                return (env.name, count) if count > 1 else None
        except Exception as e:  # metadata server unreachable, ...: say so rather than guess
            logging.warning("TPU cluster detection (%s) failed: %s", env.__name__, e)
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start JAX's multi-process runtime if this is one of several processes. Call it before anything touches
    jax devices (jax.devices(), a computation, a device_put). Returns whether the runtime is on.

    - Explicit: the arguments, else the environment (JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES,
      JAX_PROCESS_ID); one that is still missing is left to JAX's cluster detection. num_processes=1: nothing.
      With all three, every local device is used (unless JAX_LOCAL_DEVICE_IDS says otherwise).
    - Otherwise automatic: under SLURM with SLURM_NTASKS > 1 or on a multi-worker Cloud TPU slice,
      `jax.distributed.initialize()` with no arguments (JAX detects address, count and index; under SLURM on
      GPUs it also gives each task one GPU, the one numbered SLURM_LOCALID: start one task per GPU).
    - Otherwise (one process) nothing is done.
    On CPU, cross-process collectives use gloo (jax_cpu_collectives_implementation) unless set otherwise.
    The runtime also starts JAX's preemption sync manager (see PreemptionNotice).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = (coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return False
    if all(v is None for v in explicit):
        cluster = detected_cluster()
        if cluster is None:
            return False
        logging.info("multi-process job detected (%s, %d processes): jax.distributed.initialize()", *cluster)
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # All three given: JAX's cluster detection stays off. Under srun it would otherwise also restrict each process
    # to one GPU (local_device_ids=[SLURM_LOCALID]), wrong for one process per node driving all its GPUs.
    # JAX_LOCAL_DEVICE_IDS still restricts them when set.
    complete = None not in explicit
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method="deactivate" if complete else None)
    except ValueError as e:  # JAX could not fill in what was left out
        raise ValueError(
            f"multi-process start-up with coordinator_address={coordinator_address}, num_processes={num_processes}, "
            f"process_id={process_id} failed ({e}): give all three (--coordinator_address=HOST:PORT "
            f"--num_processes=N --process_id=I, or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})") from e
    return True


def define_distributed_flags() -> tuple:
    """Defines --coordinator_address, --num_processes and --process_id for an entry point (hd.main; hd.pipeline
    may call it too); pass the returned holders' values to initialize_distributed after flag parsing."""
    return (
        flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator "
                            f"(the same in every process); default ${ENV_COORDINATOR}, or detected under SLURM / on "
                            "a Cloud TPU slice."),
        flags.DEFINE_integer("num_processes", None, f"Multi-process runs: number of processes (default "
                             f"${ENV_NUM_PROCESSES}, or detected)."),
        flags.DEFINE_integer("process_id", None, f"Multi-process runs: this process's index in [0, num_processes) "
                             f"(default ${ENV_PROCESS_ID}, or detected)."),
    )


def log_topology() -> None:
    """Process index and count, local and global device counts (initialises the backend)."""
    logging.info("process %d of %d: %d local of %d %s devices (%s)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend(),
                 "jax.distributed on" if jax.distributed.is_initialized() else "single process")


def shutdown_distributed() -> None:
    """Leave the multi-process runtime together (a barrier over all processes); no-op for one process."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def run_processes(run: Callable[[], None], distributed_flags: tuple) -> None:
    """An entry point's body in every process: start the multi-process runtime (flags from
    define_distributed_flags, else the environment) before anything touches a device, run, and leave together.
    Preemption (SystemExit 143) stops every process at the same step, so they shut down together too; other
    errors skip the shutdown barrier: the process exits at once and the others learn it from the coordination
    service instead of waiting for it."""
    initialize_distributed(*(holder.value for holder in distributed_flags))
    log_topology()
    try:
        run()
    except SystemExit:
        shutdown_distributed()
        raise
    shutdown_distributed()


def _preemption_sync_manager() -> Any:
    if not jax.distributed.is_initialized():
        return None
    try:
        from jax._src import distributed  # local: a private JAX module, guarded by the except
    except ImportError:
        return None
    return getattr(distributed.global_state, "preemption_sync_manager", None)


class PreemptionNotice:
    """Context manager; `reached(step)`, called once per step on every process, says whether to checkpoint and
    stop after this step. It answers True at the same step on every process.

    - Several processes (jax.distributed on): JAX's preemption sync manager, which jax.distributed.initialize
      starts and which catches SIGTERM in any process (a C++ handler, so no Python handler is installed here:
      it would replace that one). The processes then agree on the first step none of them has passed
      (`multihost_utils.reached_preemption_sync_point`). Every process must call `reached` at every step,
      starting from the same step (true after a resume: all restore the same checkpoint).
    - One process: a Python SIGTERM handler sets a flag that the next call sees.
    """

    def __init__(self):
        self.synced = _preemption_sync_manager() is not None
        self._flag: list[bool] = []
        self._previous = None

    def __enter__(self) -> "PreemptionNotice":
        if not self.synced:
            if jax.process_count() > 1:
                logging.warning("JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM stops "
                                "only the process that gets it, without an agreed checkpoint")
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.append(True))
        return self

    def reached(self, step: int) -> bool:
        if self.synced:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self._flag)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; one axis may be -1 to take the remaining devices. Devices are
    ordered by process (stable), so the batch rows of process p are the p-th contiguous block (see
    process_batch_rows), the block hd.data's iterator gives process p."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: d.process_index)
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}) does not cover the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples are split over every device (data and fsdp axes alike)."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _spec_for(name: str, shape: tuple[int, ...], rules: Sequence[tuple[str, str]], fsdp_size: int) -> P:
    for regex, rule in rules:
        if re.fullmatch(regex, name):
            break
    else:
        rule = "replicate"
    if rule == "replicate" or fsdp_size == 1 or not shape:
        return P()
    # Largest dimension that divides evenly; ties go to the last one (output features).
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs). Optimizer states mirror the
    parameter paths (".../mu/blocks_0/.../kernel"), so the same rules shard them alike."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _spec_for(path_name(path), tuple(leaf.shape), rules, fsdp_size)),
        tree)


def process_batch_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under `sharding` (one contiguous block)."""
    indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    bounds = sorted({idx[0].indices(global_batch_size)[:2] for idx in indices})
    start, stop = bounds[0][0], bounds[0][1]
    for lo, hi in bounds[1:]:
        if lo > stop:
            raise ValueError(f"process {jax.process_index()} holds batch rows {bounds}: not one contiguous block")
        stop = max(stop, hi)
    return slice(start, stop)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each host's rows into one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
