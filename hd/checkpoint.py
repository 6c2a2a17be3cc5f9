"""Orbax checkpoints: one manager per stage work directory, one named item per state field plus the data
iterator position, and the hand-off that lets a later stage read an earlier stage's items."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_ITEM = "data"
COUNTERS_ITEM = "counters"  # scalar fields (step, skip counts): orbax saves pytrees, not bare scalars


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


class Checkpointer:
    """Saves a dataclass train state field by field (`params`, `ema_params`, `opt_state`, `step`, ...) and the
    data iterator state as JSON, asynchronously, keeping the newest `keep`."""

    def __init__(self, workdir: str, *, keep: int):
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def latest_step(workdir: str) -> int | None:
    """Newest complete checkpoint step of a stage work directory, None if it has none (never writes)."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        return None
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        return manager.latest_step()


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
    `abstract_items` without a sharding are restored onto handoff_sharding(). Every process must call it."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}: run that stage first (or point the config at "
                                "the work directory that has them)")
    handlers = {name: ocp.StandardCheckpointHandler() for name in abstract_items}
    with ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint: finish that stage first")
        present = {p.name for p in (epath.Path(directory) / str(step)).iterdir()}
        missing = [name for name in abstract_items if name not in present]
        if missing:
            raise FileNotFoundError(f"checkpoint {directory}/{step} lacks items {missing} (has {sorted(present)})")
        metadata = manager.item_metadata(step)
        for name, expected in abstract_items.items():
            want, have = _shapes(expected), _shapes(metadata[name])
            if want != have:
                diff = [(p, want.get(p), have.get(p)) for p in sorted(set(want) | set(have))
                        if want.get(p) != have.get(p)][:5]
                raise ValueError(
                    f"checkpoint {directory}/{step} item '{name}' does not match the configured architecture: "
                    f"{len(have)} arrays stored vs {len(want)} expected; first differences (path, expected shape, stored shape): {diff}. "
                    "Make config.model match the stage that wrote it.")
        restored = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(_with_sharding(value, handoff_sharding()))
               for name, value in abstract_items.items()}))
        return {name: restored[name] for name in abstract_items}, step


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
