"""Orbax checkpoints: one manager per stage work directory, one named item per state field plus the data
iterator position, and the hand-off that lets a later stage read an earlier stage's items. Also the
work directory's single-writer lock and what a start reads of an earlier stage (its config.json and steps)."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint.checkpoint_managers import preservation_policy

from hd.models import abstract_params

DATA_ITEM = "data"
COUNTERS_ITEM = "counters"  # scalar fields (step, skip counts): orbax saves pytrees, not bare scalars
LOCK_FILE = "writer.lock"


def _is_scalar(value: Any) -> bool:
    return hasattr(value, "shape") and not isinstance(value, (dict, list, tuple))


def checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints; a local WORKDIR made absolute, a URL (gs://bucket/...: the shared work directory of a
    TPU pod) kept as it is."""
    if "://" in str(workdir):
        return str(epath.Path(workdir) / "checkpoints")
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def state_items(state: Any) -> dict[str, Any]:
    """A dataclass state as checkpoint items: one per tree field, plus one holding all scalar fields."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    items = {name: value for name, value in fields.items() if not _is_scalar(value)}
    items[COUNTERS_ITEM] = {name: value for name, value in fields.items() if _is_scalar(value)}
    return items


def state_from_items(state_type: type, items: dict[str, Any]) -> Any:
    fields = dict(items[COUNTERS_ITEM])
    fields.update({name: value for name, value in items.items() if name not in (COUNTERS_ITEM, DATA_ITEM)})
    return state_type(**fields)


# --- disk space -----------------------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` or anything it was raised from is 'no space left' (orbax raises OSError(ENOSPC) or a
    ValueError carrying TensorStore's RESOURCE_EXHAUSTED text, depending on which write hit the limit)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in _NO_SPACE or re.search(
                r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'", str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFullError(OSError):
    def __init__(self, path: str, what: str, kept: int | None):
        kept_text = (f"checkpoint step {kept} is intact and the run resumes from it" if kept is not None
                     else "no earlier checkpoint exists, so the run starts again from step 0")
        super().__init__(errno.ENOSPC, f"no disk space left under {path} while {what}: free space there (or "
                                       f"lower config.keep_checkpoints) and rerun the same command; {kept_text}")


# --- reading what a directory holds (never writes) ----------------------------------------------------------

def complete_steps(workdir: str) -> list[int]:
    """Finalized checkpoint steps of a work directory, oldest first ([] if it has none); never writes."""
    directory = epath.Path(checkpoint_dir(workdir))
    if not directory.is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


def latest_step(workdir: str) -> int | None:
    """Newest complete checkpoint step of a stage work directory, None if it has none (never writes)."""
    steps = complete_steps(workdir)
    return steps[-1] if steps else None


def read_stored_config(workdir: str) -> dict | None:
    """The config.json a run wrote in its work directory (plus the keys the loop adds, e.g. `sources`), None if
    there is none."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it from the config history "
                         f"({epath.Path(workdir) / 'config_history.jsonl'}) or remove it") from None


def describe_source(workdir: str, role: str, expected_stage: str, *, allow_unfinished: bool = False,
                    warn: bool = True) -> dict:
    """What a hand-off will read from another stage's work directory, checked before any array is read:
    {workdir, stage, step, num_steps}. Errors: no config.json (named), a directory of another stage (both
    named), no checkpoint, or a run that has not reached its config.json num_steps (unless `allow_unfinished`).
    A directory whose config.json has a top-level `imported_from` (weights converted from elsewhere) counts as
    finished at its newest checkpoint."""
    path = epath.Path(workdir) / "config.json"
    stored = read_stored_config(workdir)
    if stored is None:
        raise FileNotFoundError(f"{role} work directory {workdir} has no {path.name} ({path} is missing), so "
                                f"what it holds cannot be checked: point the config at a {expected_stage} stage's "
                                "work directory written by hd.main or hd.pipeline")
    imported = "imported_from" in stored
    stage = stored.get("stage", "teacher" if imported else None)  # an importer writes teachers only
    if stage != expected_stage:
        raise ValueError(f"{role} work directory {workdir} holds a {stage!r} stage ({path}: stage={stage!r}), "
                         f"but the {role} must be a {expected_stage!r} stage: point the config at the "
                         f"{expected_stage} stage's work directory")
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"{role} work directory {workdir} ({expected_stage} stage) holds no complete "
                                f"checkpoint in {checkpoint_dir(workdir)}: run that stage first")
    num_steps = int(stored.get("num_steps", step)) if not imported else step
    if step < num_steps:
        message = (f"{role} work directory {workdir} ({expected_stage} stage) is unfinished: its newest "
                   f"checkpoint is step {step} of its num_steps={num_steps}")
        if not allow_unfinished:
            raise ValueError(f"{message}: finish that stage (rerun it with the same command), or pass "
                             f"--config.allow_unfinished_sources=True to use step {step} anyway")
        if warn:
            logging.warning("%s; using it because config.allow_unfinished_sources=True", message)
    info = {"workdir": str(workdir), "stage": stage, "step": step, "num_steps": num_steps}
    if imported:
        info["imported_from"] = stored["imported_from"]
    return info


# --- the single writer of a work directory ----------------------------------------------------------------

class WorkdirInUse(RuntimeError):
    pass


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), None where there is
    no /proc: tells a live process from a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process a lock record names still runs (only answerable on its own host)."""
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = owner.get("process_start"), _process_start(int(owner["pid"]))
    return recorded is None or now is None or recorded == now


def _owner_text(owner: dict) -> str:
    return f"pid {owner.get('pid')}@{owner.get('host')} (started {owner.get('started', '?')})"


class WriterLock:
    """One writer per work directory: WORKDIR/writer.lock holds the writer's pid, host and start time.

    Local and network file systems: the file is held with an exclusive flock(2) for the whole run. The kernel
    drops a flock when its process dies, also by kill -9, so a lock file whose flock is free is stale and is
    taken over (logged with the previous owner). A second writer fails at once, naming the holder.
    URLs (gs://): object stores have no locks and no atomic create, so this is a best-effort check: a record of
    a live process on this host, or of any other host, is an error (delete the file if that run is gone); two
    starts within moments of each other can both pass. The launch scripts run one job per work directory.
    Several processes (one job): only process 0 takes the lock.
    """

    def __init__(self, workdir: str):
        self.path = epath.Path(workdir) / LOCK_FILE
        self._url = "://" in str(workdir)
        self._fd: int | None = None

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _read(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and "pid" in owner else None
        except (OSError, json.JSONDecodeError):
            return None

    def _in_use(self, owner: dict) -> WorkdirInUse:
        where = self.path.parent
        return WorkdirInUse(
            f"work directory {where} is in use by {_owner_text(owner)} (lock file {self.path}): one run writes a "
            "work directory at a time. Wait for that run or stop it, or use another --workdir. If that process is "
            f"gone and this host cannot tell (another host, or gs://), delete {self.path}.")

    def check(self) -> None:
        """Fail now, before any compile, if a live writer holds the lock (reads only; `acquire` decides)."""
        if self._url:
            owner = self._read()
            if owner is not None and not self._stale(owner):
                raise self._in_use(owner)
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(self._read() or {"pid": "?", "host": "?"}) from None
        except OSError:
            return  # no flock here: acquire() falls back to the pid check
        finally:
            os.close(fd)

    def _stale(self, owner: dict) -> bool:
        return owner.get("host") == socket.gethostname() and not _alive(owner)

    def acquire(self) -> None:
        if self._url:
            owner = self._read()
            if owner is not None:
                if not self._stale(owner):
                    raise self._in_use(owner)
                logging.warning("taking over the stale lock %s of %s (no longer running)", self.path,
                                _owner_text(owner))
            self.path.write_text(json.dumps(self._record()))
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(self._read() or {"pid": "?", "host": "?"}) from None
            except OSError:  # a file system without flock: the pid check alone
                flocked = False
            # The holder that just released may have unlinked the file: lock the file that is at the path now.
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            break
        previous = self._read()
        if previous is not None and previous.get("pid") != os.getpid():
            if not flocked and not self._stale(previous):
                os.close(fd)
                raise self._in_use(previous)
            logging.warning("taking over the stale lock %s of %s: that process no longer holds it (it ended "
                            "without releasing it, e.g. killed)", self.path, _owner_text(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._url:
            owner = self._read()
            if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            return
        if self._fd is not None:
            try:
                os.unlink(self.path)  # before unlocking: a waiting writer then re-opens a fresh file
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# --- the writing checkpointer -----------------------------------------------------------------------------

@dataclasses.dataclass
class _KeepPinned:
    """Orbax preservation policy: keep the steps in `steps` (a set the Checkpointer updates) whatever
    keep_checkpoints says."""

    steps: set

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        return [c.step in self.steps for c in checkpoints]


class CheckpointUnreadable(RuntimeError):
    pass


def _innermost_line(error: BaseException) -> str:
    """The most specific message of an error chain (TensorStore's file-level reason sits at the bottom), one
    line, without the JSON spec dumps."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in reversed(chain):
        text = str(e).split("[tensorstore_spec", 1)[0].split("See full TensorStore", 1)[0].strip()
        if text:
            line = text.splitlines()[0]
            return f"{type(e).__name__}: {line[:400]}"
    return type(chain[0]).__name__


def describe_unreadable(step_dir: epath.Path, items: Sequence[str], error: BaseException) -> str:
    """Which item (and file) of a checkpoint failed to restore, from the directory and the error."""
    missing = [name for name in items if not (step_dir / name).exists()]
    if missing:
        return f"item(s) {missing} missing (no {step_dir / missing[0]})"
    where = re.findall(r"'path': '([^']+)'", str(error)) + re.findall(r'"path":"([^"]+)"', str(error))
    item = next((p.rstrip("/").rsplit("/", 1)[-1] for p in where if str(step_dir) in p), None)
    array = next((p.rstrip("/") for p in where if not p.startswith("/") and "://" not in p), None)
    label = f"item '{item}'" if item else "an item"
    if array:
        label += f", array '{array}'"
    return f"{label} under {step_dir} does not read back ({_innermost_line(error)})"


class Checkpointer:
    """Saves a dataclass train state field by field (`params`, `ema_params`, `opt_state`, `step`, ...) and the
    data iterator state as JSON, asynchronously, keeping the newest `keep` plus any pinned step (see `pin`)."""

    def __init__(self, workdir: str, *, keep: int):
        self.directory = checkpoint_dir(workdir)
        self._pinned = _KeepPinned(set())
        policy = preservation_policy.AnyPreservationPolicy([preservation_policy.LatestN(keep), self._pinned])
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                                 enable_async_checkpointing=True, cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def pin(self, step: int) -> None:
        """Keep `step` through pruning until another step is pinned (the loop pins the newest checkpoint
        written without a skipped update since the one before, so a divergence never prunes the last good one)."""
        self._pinned.steps.clear()
        self._pinned.steps.add(step)

    def reload(self) -> None:
        """Re-read the step list (after steps were moved out of the directory)."""
        self._manager.reload()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        args = {name: ocp.args.StandardSave(value) for name, value in state_items(state).items()}
        args[DATA_ITEM] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs), which may differ from
        the mesh the checkpoint was written on; leaves without one go to handoff_sharding(). Every process
        must call it (and save), with the same step."""
        step = self.latest_step() if step is None else step
        args = {name: ocp.args.StandardRestore(_with_sharding(value, handoff_sharding()))
                for name, value in state_items(abstract_state).items()}
        args[DATA_ITEM] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return state_from_items(type(abstract_state), dict(restored.items())), restored[DATA_ITEM]

    def restore_newest(self, abstract_state: Any, steps: Sequence[int]) -> tuple[Any, dict, int, dict[int, str]]:
        """The newest of `steps` that restores: (state, data state, step, {unreadable newer step: why}). A step
        that fails (a truncated or deleted array file, a deleted item) is logged and skipped, never deleted;
        when none restores, CheckpointUnreadable names each step with its item and file."""
        failures: dict[int, str] = {}
        items = [*state_items(abstract_state), DATA_ITEM]
        for step in sorted(steps, reverse=True):
            try:
                state, data_state = self.restore(abstract_state, step)
            except Exception as e:  # orbax raises bare Exception, KeyError, ValueError, OSError
                failures[step] = describe_unreadable(epath.Path(self.directory) / str(step), items, e)
                logging.warning("checkpoint step %d in %s does not restore: %s; trying the next older one",
                                step, self.directory, failures[step])
                continue
            return state, data_state, step, failures
        raise CheckpointUnreadable(
            f"no checkpoint in {self.directory} restores: " + "; ".join(f"step {s}: {why}" for s, why in
                                                                       failures.items()) +
            ". Nothing was deleted: restore the files from a copy, or move the checkpoints directory away to start "
            "again from step 0.")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()


def move_steps_aside(workdir: str, steps: Sequence[int], name: str) -> str:
    """Move checkpoint steps out of the manager's sight into WORKDIR/NAME/STEP (nothing is deleted); returns
    the directory. Process 0 only."""
    target = epath.Path(workdir) / name
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
        (epath.Path(checkpoint_dir(workdir)) / str(step)).rename(target / str(step))
    return str(target)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def handoff_sharding() -> NamedSharding:
    """Where read_items puts arrays whose abstract value names no sharding: one full copy per process, on its
    first device. Explicit, so a checkpoint written on another mesh or by other processes (whose sharding
    file names devices this run may not have) loads anywhere, and with several processes the result is one
    global, fully replicated array that every process can read, close over in a jitted function and
    device_put onto any sharding."""
    first = {}
    for device in jax.devices():
        first.setdefault(device.process_index, device)
    return NamedSharding(Mesh(np.asarray([first[p] for p in sorted(first)]), ("process",)), PartitionSpec())


def _with_sharding(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def read_items(workdir: str, abstract_items: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], int]:
    """Read only the named items of another stage's newest complete checkpoint (e.g. the teacher's
    `ema_params`) without writing to that directory. Before reading any array, the stored tree is compared with
    the expected one, so a checkpoint of another architecture is an error naming both. Leaves of
    `abstract_items` without a sharding are restored onto handoff_sharding(). Every process must call it.

    Each item is read on its own through its handler (no manager), so the items not asked for are not opened
    and orbax has nothing to warn about; an item that does not read back is an error naming step, item and file.
    """
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}: run that stage first (or point the config at "
                                "the work directory that has them)")
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint: finish that stage first")
    step_dir = epath.Path(directory) / str(step)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{directory} has no checkpoint step {step} (it has {complete_steps(workdir)})")
    present = {p.name for p in step_dir.iterdir()}
    missing = [name for name in abstract_items if name not in present]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory}/{step} lacks items {missing} (has {sorted(present)})")
    handler = ocp.StandardCheckpointHandler()
    try:
        out = {}
        for name, expected in abstract_items.items():
            try:
                have = _shapes(handler.metadata(step_dir / name))
            except Exception as e:
                raise CheckpointUnreadable(f"checkpoint {directory}/{step}: "
                                           f"{describe_unreadable(step_dir, [name], e)}") from e
            want = _shapes(expected)
            if want != have:
                diff = [(p, want.get(p), have.get(p)) for p in sorted(set(want) | set(have))
                        if want.get(p) != have.get(p)][:5]
                raise ValueError(
                    f"checkpoint {directory}/{step} item '{name}' does not match the configured architecture: "
                    f"{len(have)} arrays stored vs {len(want)} expected; first differences (path, expected shape, "
                    f"stored shape): {diff}. "
                    "Make config.model match the stage that wrote it.")
            try:
                out[name] = handler.restore(step_dir / name,
                                            args=ocp.args.StandardRestore(_with_sharding(expected, handoff_sharding())))
            except Exception as e:
                raise CheckpointUnreadable(
                    f"checkpoint {directory}/{step}: {describe_unreadable(step_dir, [name], e)}. Nothing was "
                    "changed there: restore the file, or rerun that stage") from e
        return out, step
    finally:
        handler.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_ema_params(model, data_shape: tuple[int, ...], workdir: str, step: int | None = None) -> tuple[Any, int]:
    """(ema_params, step) of a work directory's checkpoint (newest unless `step`), the stored tree checked against
    `model`'s architecture before any array is read. No provenance check: see hd.train.stages.load_ema_params
    for hand-offs."""
    items, step = read_items(workdir, {"ema_params": abstract_params(model, data_shape)}, step=step)
    return items["ema_params"], step
