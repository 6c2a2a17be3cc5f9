"""Import a pretrained SiT as an hd teacher work directory that the sketch, refine and eval stages read as
`teacher_workdir`:

    python -m hd.tools.import_teacher --format=sit --checkpoint=SiT-XL-2-256x256.pt \
        --config=configs/imagenet256.py:teacher --workdir=runs/imagenet256/teacher

Inputs: the official SiT release (`.pt`, a plain state dict), a checkpoint whose state dict sits under `ema`,
`model`, `state_dict` or `module` (REPA-style training checkpoints; `ema` is preferred; heads that only served
training, `projectors.*`, are dropped and listed), or a `.safetensors` file (read with safetensors' numpy API,
no torch). Reading a `.pt` needs PyTorch (`pip install torch`, CPU build; not in requirements.txt).

Output: WORKDIR/checkpoints/<config.num_steps>/ (a full teacher TrainState written by hd.checkpoint.Checkpointer:
params = ema_params = the imported weights, fresh optimizer state, step = config.num_steps, so the teacher stage
counts as finished) and WORKDIR/config.json (the teacher config plus `imported_from`: file, sha256, format,
convention, dropped keys), written last. An existing non-empty WORKDIR is never touched; every check on the
file and the config runs before anything is written.

Conventions. hd has data at t = 0 and predicts v = eps - x (hd/flow.py). The official SiT code has data at
t = 1 and predicts x - eps (`--convention=sit`, the default), so the imported network must satisfy
v_hd(z, t) = -v_SiT(z, 1 - t). Both changes are folded into the weights, leaving an ordinary hd DiT:
  * time flip: the sinusoidal features of 1 - t are a fixed linear map of those of t (per frequency w,
    cos w(1-t) = cos w cos wt + sin w sin wt and sin w(1-t) = sin w cos wt - cos w sin wt), which is multiplied
    into the first Dense kernel of t_embedder (`time_flip_matrix`). Exact up to float32 rounding; it needs
    t to enter unscaled, as in SiT (config.model.time_scale = 1).
  * sign: the final linear layer's kernel and bias are negated.
REPA-style checkpoints trained with REPA's linear path already use hd's convention (data at t = 0, target
eps - x): import them with `--convention=repa`, which copies the weights as they are.
learn_sigma: SiT's released weights have 2C output channels (velocity, then a learned variance that SiT's
sampler ignores). Only the velocity channels of the final linear layer are kept (outputs are ordered
(row, column, channel) within a patch), so the teacher is an hd DiT with model.learn_sigma = False like every
other stage's config; with learn_sigma = True in the config all 2C channels are kept.
pos_embed: SiT stores its fixed 2-D sin-cos positions; they are compared with hd's (an error if they differ)
and not imported. h_embedder (hd's second time embedding, absent in SiT) is initialised as hd initialises it,
output layer at zero, so the teacher ignores h exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from safetensors.numpy import load_file

from hd.checkpoint import Checkpointer
from hd.config import validate
from hd.eval.inception import file_sha256
from hd.files import replace_json
from hd.logs import quiet_library_logs
from hd.models import build_model, init_params
from hd.models.dit import DIT_SIZES, TimestepEmbedder, sincos_pos_embed_2d
from hd.train.stages import teacher_stage
from hd.train.state import TrainState, make_optimizer

FORMATS = ("sit", "dit")
CONVENTIONS = ("sit", "repa")
# Containers of the state dict in training checkpoints, in order of preference (the EMA weights sample best).
NESTING_KEYS = ("ema", "model", "state_dict", "module")
# Heads that only served training (REPA's representation-alignment projectors): dropped, and listed.
TRAINING_ONLY_PREFIXES = ("projectors.",)
DIT_UNSUPPORTED = ("--format=dit is not supported: DiT checkpoints predict eps on a discrete 1000-step VP "
                   "schedule (with a learned variance), which is not a velocity at continuous t. Use a SiT "
                   "checkpoint (--format=sit).")


class TeacherImportError(ValueError):
    """A checkpoint or config that cannot be imported (the message names the key or setting and the fix)."""


# --- Reading -----------------------------------------------------------------------------------------------------

def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: bfloat16 and float16 have no exact numpy twin
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def _unnest(tree: dict, source: str) -> tuple[dict, str]:
    """The state dict of a (possibly nested) checkpoint and the key it sat under ('' = top level)."""
    if any(hasattr(v, "shape") for v in tree.values()):
        return tree, ""
    for key in NESTING_KEYS:
        if isinstance(tree.get(key), dict):
            return tree[key], key
    raise TeacherImportError(f"{source}: no state dict found: the top level has no arrays and none of the keys "
                             f"{NESTING_KEYS} (it has {sorted(map(str, tree))[:10]})")


def read_state_dict(path: str, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """{name: float32 or integer array} of a `.safetensors` or `.pt`/`.pth` file, and the key it was nested
    under ('' for a plain state dict). A `DistributedDataParallel` 'module.' prefix is removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint={path}: no such file")
    if path.endswith(".safetensors"):
        try:
            tree, nested = load_file(path), ""
        except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy cannot hold
            raise TeacherImportError(f"{path}: safetensors' numpy reader failed ({e}); save the weights as float32 "
                                     "safetensors or pass the .pt") from e
    else:
        try:
            import torch  # local: optional, not in requirements.txt; only a .pt checkpoint needs it
        except ImportError as e:
            raise TeacherImportError(f"reading {path} needs PyTorch: pip install torch (the CPU build is enough), or "
                                     "convert the state dict to .safetensors elsewhere and pass that") from e
        try:
            tree = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError subclasses and others
            if allow_pickle:
                raise
            raise TeacherImportError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}). Training checkpoints often pickle other "
                                     "objects (e.g. argparse options); if you trust the file, pass --allow_pickle "
                                     "(this runs its pickled code).") from e
        if not isinstance(tree, dict):
            raise TeacherImportError(f"{path}: holds a {type(tree).__name__}, not a state dict")
        tree, nested = _unnest(tree, path)
    state = {str(k): _to_numpy(v) for k, v in tree.items() if hasattr(v, "shape")}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}, nested


# --- The time flip ----------------------------------------------------------------------------------------------

def timestep_frequencies_np(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """The frequencies of hd's `timestep_frequencies` (and SiT's), as the float32 values both compute."""
    half = dim // 2  # a Python float times a float32 array stays float32 (as in jax and torch)
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(np.float32)


def time_flip_matrix(dim: int) -> np.ndarray:
    """R [dim, dim] (float64) with features(1 - t) = features(t) @ R for hd's features [cos wt, sin wt]
    (cos first). Per frequency it is the reflection [[cos w, sin w], [sin w, -cos w]]."""
    if dim % 2:
        raise ValueError(f"frequency size {dim} must be even")
    w = timestep_frequencies_np(dim).astype(np.float64)
    half = dim // 2
    cos, sin = np.cos(w), np.sin(w)
    r = np.zeros((dim, dim))
    idx = np.arange(half)
    r[idx, idx] = cos  # cos w(1-t) takes cos w * cos wt ...
    r[half + idx, idx] = sin  # ... + sin w * sin wt
    r[idx, half + idx] = sin  # sin w(1-t) takes sin w * cos wt ...
    r[half + idx, half + idx] = -cos  # ... - cos w * sin wt
    return r


# --- Mapping -----------------------------------------------------------------------------------------------------

def _dense(name: str) -> dict[str, tuple[str, str]]:
    """hd Dense leaves <- torch Linear (kernel = weight transposed)."""
    return {f"{name}/kernel": "T", f"{name}/bias": ""}


def _key_map(depth: int) -> dict[str, tuple[str, str]]:
    """hd parameter path -> (SiT state-dict key, transform) for every imported leaf."""
    pairs = {
        "x_embedder/kernel": ("x_embedder.proj.weight", "conv"),
        "x_embedder/bias": ("x_embedder.proj.bias", ""),
        "t_embedder/mlp_0/kernel": ("t_embedder.mlp.0.weight", "time"),
        "t_embedder/mlp_0/bias": ("t_embedder.mlp.0.bias", ""),
        "t_embedder/mlp_2/kernel": ("t_embedder.mlp.2.weight", "T"),
        "t_embedder/mlp_2/bias": ("t_embedder.mlp.2.bias", ""),
        "y_embedder/embedding": ("y_embedder.embedding_table.weight", ""),
        "final_layer/adaLN_modulation/kernel": ("final_layer.adaLN_modulation.1.weight", "T"),
        "final_layer/adaLN_modulation/bias": ("final_layer.adaLN_modulation.1.bias", ""),
        "final_layer/linear/kernel": ("final_layer.linear.weight", "out_kernel"),
        "final_layer/linear/bias": ("final_layer.linear.bias", "out_bias"),
    }
    torch_names = {"attn/qkv": "attn.qkv", "attn/proj": "attn.proj", "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2",
                   "adaLN_modulation": "adaLN_modulation.1"}
    for i in range(depth):
        for hd_name, torch_name in torch_names.items():
            pairs[f"blocks_{i}/{hd_name}/kernel"] = (f"blocks.{i}.{torch_name}.weight", "T")
            pairs[f"blocks_{i}/{hd_name}/bias"] = (f"blocks.{i}.{torch_name}.bias", "")
    return pairs


def _flat(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _unflat(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def _natural(key: str) -> list:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _checkpoint_architecture(state: dict[str, np.ndarray]) -> str:
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    hidden = state["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in state else "?"
    return f"hidden {hidden}, depth {len(blocks)}"


def check_teacher_config(config: Any) -> tuple[int, ...]:
    """The example shape the teacher is built for; errors for a config that cannot hold an imported SiT."""
    if config.stage != "teacher":
        raise TeacherImportError(f"--config has stage={config.stage!r}: an imported network is a teacher; use the "
                                 "config's teacher variant (e.g. configs/imagenet256.py:teacher)")
    if config.model.name != "dit":
        raise TeacherImportError(f"config.model.name={config.model.name!r}: SiT checkpoints import into the DiT "
                                 "(model.name='dit')")
    if config.model.time_scale != 1.0:
        raise TeacherImportError(f"config.model.time_scale={config.model.time_scale}: SiT feeds t in [0, 1] unscaled, "
                                 "so the teacher needs --config.model.time_scale=1.0")
    shape = tuple(config.data.example_shape)
    if len(shape) != 3:
        raise TeacherImportError("config.data.example_shape is not set: give the latent shape the checkpoint was "
                                 "trained on, e.g. --config.data.example_shape='(32, 32, 4)' for 256x256 SD-VAE "
                                 "latents")
    if config.model.size not in DIT_SIZES:
        raise TeacherImportError(f"config.model.size={config.model.size!r} is not one of {tuple(DIT_SIZES)}")
    return shape


def convert_sit(state: dict[str, np.ndarray], config: Any, *, convention: str = "sit", seed: int = 0
                ) -> tuple[dict, list[str]]:
    """hd DiT parameters (nested dict of float32 numpy arrays) from a SiT state dict, and the dropped keys.

    Every key and shape is checked before any conversion; errors name the key and both shapes."""

    if convention not in CONVENTIONS:
        raise TeacherImportError(f"--convention={convention!r} is not one of {CONVENTIONS}")
    data_shape = check_teacher_config(config)
    model = build_model(config.model, data_shape, config.data.num_classes)
    expected = {k: tuple(v.shape) for k, v in _flat(jax.eval_shape(
        lambda: init_params(model, jax.random.PRNGKey(0), data_shape))).items()}
    hidden, depth, _ = DIT_SIZES[config.model.size]
    p, channels = config.model.patch_size, data_shape[-1]
    out_channels = channels * (2 if config.model.learn_sigma else 1)
    grid = data_shape[0] // p
    mapping = _key_map(depth)

    # The checkpoint shape of every key: hd's shape in torch's layout. The output layer may also carry the
    # learned-variance half (2C channels per patch position), of which only the velocity part is kept.
    def torch_shapes(hd_path: str, transform: str) -> tuple[tuple[int, ...], ...]:
        shape = expected[hd_path]
        if transform == "conv":
            return ((shape[3], shape[2], shape[0], shape[1]),)
        if transform in ("T", "time", "out_kernel"):
            shape = shape[::-1]
        if transform in ("out_kernel", "out_bias") and not config.model.learn_sigma:
            return shape, (2 * shape[0],) + shape[1:]
        return (shape,)

    wanted = {key: torch_shapes(hd_path, transform) for hd_path, (key, transform) in mapping.items()}
    wanted["pos_embed"] = ((1, grid * grid, hidden), (grid * grid, hidden))
    shapes_text = lambda options: " or ".join(map(str, options))

    # Which checkpoint keys are used, dropped or unknown; then every shape. All before any conversion.
    dropped = sorted((k for k in state if k not in wanted and k.startswith(TRAINING_ONLY_PREFIXES)), key=_natural)
    unknown = sorted((k for k in state if k not in wanted and k not in dropped), key=_natural)
    missing = sorted((k for k in wanted if k not in state), key=_natural)
    arch = (f"config: hidden {hidden}, depth {depth} (model.size={config.model.size!r}), patch {p}, "
            f"{config.data.num_classes} classes, examples {data_shape}; checkpoint: {_checkpoint_architecture(state)}")
    if unknown or missing:
        listed = lambda keys, shape: ", ".join(f"{k} {shape(k)}" for k in keys[:8]) + (" ..." if len(keys) > 8 else "")
        raise TeacherImportError(
                                 f"the checkpoint does not match the configured DiT ({arch}). "
            + (f"Missing keys (expected shape): {listed(missing, lambda k: shapes_text(wanted[k]))}. "
               if missing else "")
            + (f"Unexpected keys (shape): {listed(unknown, lambda k: tuple(state[k].shape))} (hd's DiT has no such "
               "parameters, e.g. qk-norm, so they cannot be dropped silently). " if unknown else "")
            + "Pick the config (model.size, model.patch_size, data.num_classes, data.example_shape) that matches "
              "the checkpoint.")
    bad = [f"{key}: checkpoint {tuple(state[key].shape)}, expected {shapes_text(options)}"
           for key, options in wanted.items() if tuple(state[key].shape) not in options]
    if bad:
        raise TeacherImportError(f"misshaped keys ({arch}): " + "; ".join(bad))
    reference = sincos_pos_embed_2d(hidden, grid)
    pos_error = float(np.max(np.abs(state["pos_embed"].reshape(reference.shape) - reference)))
    if pos_error > 1e-4:
        raise TeacherImportError(f"pos_embed differs from hd's fixed 2-D sin-cos positions by up to {pos_error:.3g}: "
                                 "this is not a SiT/DiT with fixed positions (hd does not learn them)")

    flip = convention == "sit"
    sign = -1.0 if flip else 1.0
    # Channels of the output layer to keep: rows ordered (row-in-patch, column-in-patch, channel).
    stored_channels = state["final_layer.linear.bias"].shape[0] // (p * p)
    keep = (np.arange(p * p)[:, None] * stored_channels + np.arange(out_channels)[None]).reshape(-1)
    flat = {}
    for hd_path, (key, transform) in mapping.items():
        w = state[key].astype(np.float64)
        if transform == "conv":
            w = w.transpose(2, 3, 1, 0)
        elif transform == "T":
            w = w.T
        elif transform == "time":
            w = time_flip_matrix(w.shape[1]) @ w.T if flip else w.T
        elif transform == "out_kernel":
            w = sign * w[keep].T
        elif transform == "out_bias":
            w = sign * w[keep]
        flat[hd_path] = w.astype(np.float32)
    # hd's h-embedding, absent in SiT: hd's TimestepEmbedder initialised as the DiT initialises it (output layer
    # zero, so the teacher ignores h exactly). Only this module is initialised: initialising the whole network
    # would draw every other tensor just to replace it.
    h_embedder = TimestepEmbedder(hidden, zero_output=True).init(jax.random.PRNGKey(seed), jnp.zeros((1,)))
    for path, value in _flat(h_embedder["params"]).items():
        flat[f"h_embedder/{path}"] = np.asarray(value)
    if set(flat) != set(expected):
        raise AssertionError(f"internal: converted {sorted(set(flat) ^ set(expected))} differ from the model")
    for path, value in flat.items():
        if value.shape != expected[path]:
            raise AssertionError(f"internal: {path} converted to {value.shape}, model wants {expected[path]}")
    return _unflat(flat), dropped


# --- Writing -----------------------------------------------------------------------------------------------------

def _check_workdir(workdir: str) -> None:
    if "://" in workdir:
        raise TeacherImportError(f"--workdir={workdir}: import to a local directory, then copy it")
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise TeacherImportError(f"--workdir={workdir} exists and is not empty: it is never overwritten; choose a new "
                                 "directory (or remove that one yourself)")


def write_teacher_workdir(params: dict, config: Any, workdir: str, imported_from: dict) -> None:
    """WORKDIR/checkpoints/<num_steps> (teacher TrainState: params = ema_params, fresh optimizer state) and then
    WORKDIR/config.json with `imported_from`. A failure removes what this call created."""

    _check_workdir(workdir)
    data_shape = check_teacher_config(config)
    weights = jax.tree.map(jnp.asarray, params)
    # The teacher stage's optimizer (h_embedder frozen) at its initial state; the whole state must have the
    # teacher stage's layout so hand-off and resume read it like a trained teacher's.
    state = TrainState.create(weights, make_optimizer(config.optimizer, frozen_prefixes=("h_embedder",)))
    step = int(config.num_steps)
    state = state.replace(step=jnp.asarray(step, jnp.int32), ema_params=weights)
    layout = jax.eval_shape(teacher_stage(config, data_shape).init_state, jax.random.PRNGKey(0))
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    if shapes(state) != shapes(layout):
        raise AssertionError("internal: the imported state's layout differs from the teacher stage's")
    # The data position of a teacher run that went to the end, so resuming the teacher stage here is a no-op.
    data_state = {"step": step, "seed": config.seed, "global_batch_size": config.batch_size}

    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        checkpointer = Checkpointer(workdir, keep=1)
        try:
            checkpointer.save(step, state, data_state)
        finally:
            checkpointer.close()
        record = json.loads(config.to_json_best_effort())
        record["imported_from"] = imported_from
        replace_json(os.path.join(workdir, "config.json"), record)  # last: its presence marks a finished import
    except BaseException:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # it was empty before
            for name in os.listdir(workdir):
                path = os.path.join(workdir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def import_teacher(checkpoint: str, config: Any, workdir: str, *, format: str = "sit", convention: str = "sit",
                   allow_pickle: bool = False, seed: int = 0) -> dict:
    """Convert `checkpoint` and write the teacher work directory; returns the `imported_from` record."""
    if format == "dit":
        raise TeacherImportError(DIT_UNSUPPORTED)
    if format not in FORMATS:
        raise TeacherImportError(f"--format={format!r} is not one of {FORMATS}")
    _check_workdir(workdir)  # before reading gigabytes
    check_teacher_config(config)

    validate(config, jax.device_count())
    state, nested = read_state_dict(checkpoint, allow_pickle=allow_pickle)
    params, dropped = convert_sit(state, config, convention=convention, seed=seed)
    record = {"file": os.path.abspath(checkpoint), "sha256": file_sha256(checkpoint), "format": format,
              "convention": convention, "nested_under": nested, "dropped_keys": dropped,
              "output_channels_kept": int(config.data.example_shape[-1] * (2 if config.model.learn_sigma else 1))}
    write_teacher_workdir(params, config, workdir, record)
    return record


def main(argv: list[str]) -> None:

    del argv
    quiet_library_logs()  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    try:
        record = import_teacher(_CHECKPOINT.value, config, _WORKDIR.value, format=_FORMAT.value,
                                convention=_CONVENTION.value, allow_pickle=_ALLOW_PICKLE.value)
    except (TeacherImportError, FileNotFoundError) as e:
        print(f"hd.tools.import_teacher: {e}", file=sys.stderr)
        sys.exit(2)
    if record["nested_under"]:
        print(f"state dict read from the checkpoint's '{record['nested_under']}' entry")
    if record["dropped_keys"]:
        print(f"dropped {len(record['dropped_keys'])} training-only keys: {', '.join(record['dropped_keys'])}")
    print(f"imported {record['file']} (sha256 {record['sha256']}; record it) into {_WORKDIR.value} at step "
          f"{config.num_steps}; convention {record['convention']}, {record['output_channels_kept']} output "
          "channels kept")


if __name__ == "__main__":  # flags only here: importing this module (tests) defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Teacher config, e.g. configs/imagenet256.py:teacher.")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "SiT checkpoint: .pt/.pth (needs torch) or .safetensors.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Teacher work directory to create (must not exist or be empty).")
    _FORMAT = flags.DEFINE_enum("format", "sit", list(FORMATS), "Checkpoint family (dit: not supported).")
    _CONVENTION = flags.DEFINE_enum("convention", "sit", list(CONVENTIONS),
                                    "sit: data at t = 1, predicts x - eps (official SiT); repa: data at t = 0, "
                                    "predicts eps - x (REPA's linear path, hd's own).")
    _ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "torch.load with weights_only=False (trusted files "
                                      "that pickle other objects).")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])
    app.run(main)
