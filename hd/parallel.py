"""Device mesh, parameter sharding by regex rules, and host-local batches as global arrays."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
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


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each host's rows into one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
