"""The schema every config starts from, and the checks run before anything compiles or writes.

Config files under configs/ call `base_config()` and set values on it. The base is locked, so a misspelt or
stale key in a config file or on the command line is an error naming the key, and ml_collections' type safety
rejects a value of the wrong type.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

STAGES = ("teacher", "sketch", "refine", "eval")


def parse_variant(config_file: str, variant: str, sizes: tuple[str, ...] = ()) -> tuple[str, str]:
    """A config file's variant string as (stage, size): 'STAGE', 'STAGE_SIZE', or a bare 'SIZE' for the teacher at
    that size ('' = the file's default size). An unknown variant is an error naming the file and the choices."""
    stage, _, size = variant.partition("_")
    if variant in sizes:
        stage, size = "teacher", variant
    if stage not in STAGES or (size and size not in sizes):
        choices = f"STAGE or STAGE_SIZE with SIZE in {sizes}, or a bare SIZE (the teacher)" if sizes else "STAGE"
        raise ValueError(f"{config_file} has no variant {variant!r}; use {choices}, with STAGE in {STAGES}")
    return stage, size


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "teacher"
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",  # fashion_mnist | tfds | toy2d
        data_dir="",  # TFDS data dir; '' = ~/.cache/hd/tfds
        tfds_name="",
        split="train",
        image_key="image",
        label_key="label",
        toy="8gaussians",  # 8gaussians | checkerboard | moons
        num_classes=10,
        idx_dir="/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
        max_in_memory_mb=1024,  # larger splits are read per batch through the TFDS data source
        # Shape of one example, (H, W, C) for images or (D,) for toy2d; () = whatever the dataset has. Set it
        # where the data is not on this machine: hd.compile_check builds the step from it alone, and training
        # checks it against the dataset's.
        example_shape=(),
        # VAE-posterior datasets of hd.data.prepare_latents (hd.data.latents): every visit draws a fresh latent
        # (mean + std * noise) * latent_scale, noise and flip seeded by (seed, step), so resume stays exact.
        latent_posterior=False,
        latent_scale=0.18215,  # the VAE's scaling_factor (SD-VAE; checked against the dataset's metadata)
        latent_flip=True,  # use the stored horizontal flip with probability 1/2 (False: never)
    ))

    c.model = ml_collections.ConfigDict(dict(
        name="dit",  # dit | mlp
        size="mini",  # tiny | mini | S | B | L | XL (see hd.models.dit.DIT_SIZES)
        patch_size=4,
        mlp_ratio=4.0,
        learn_sigma=False,
        time_scale=1.0,  # t enters the sinusoidal embedding unscaled (SiT); 1000 makes du/dt huge in the sketch
        width=256,  # mlp only
        depth=4,  # mlp only
        dtype="float32",  # float32 | bfloat16 (compute dtype; parameters stay float32)
        # DiT only: recompute each block's activations in the backward pass (jax.checkpoint) instead of keeping
        # them; lowers activation memory about depth-fold for ~1/3 more compute. Same parameters, same results.
        remat=False,
        # DiT only: one jax.lax.scan over the blocks instead of `depth` unrolled copies. Same parameter tree and
        # values (checkpoints move freely between the two); a much smaller program, so XL/2 steps compile in a
        # fraction of the time and host memory.
        scan_blocks=False,
        # DiT only: plain | fused. fused = jax.nn.dot_product_attention (cuDNN on GPUs in bfloat16, XLA elsewhere)
        # where no jax.jvp passes (teacher step, refine's scores); MeanFlow's student always runs plain.
        attention="plain",
    ))

    # Mesh axes: -1 fills the remaining devices. Batches are split over both axes.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    # Parameter / optimizer-state sharding: first matching regex on the '/'-joined path wins.
    # 'fsdp' shards the largest dimension that divides by the fsdp axis; 'replicate' keeps a full copy.
    c.sharding_rules = (("(^|.*/)(kernel|embedding)$", "fsdp"), (".*", "replicate"))

    c.batch_size = 128
    c.num_steps = 2000
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0,
    ))
    c.ema_decay = 0.999
    c.max_consecutive_skips = 20  # stop after this many non-finite updates in a row
    # Resume from this checkpoint step instead of the newest (0 or -1 = the newest): the way back from a
    # divergence. Newer steps are moved, not deleted, to WORKDIR/checkpoints_abandoned_<time>/ (logged). It acts
    # once: a rerun with the value config.json already holds resumes from the newest step as usual.
    c.restore_step = 0
    # Hand-offs read finished stages only (newest step == that stage's num_steps); True also takes an
    # unfinished one (logged, and recorded under `sources` in config.json).
    c.allow_unfinished_sources = False

    c.teacher = ml_collections.ConfigDict(dict(
        label_dropout=0.1,
        time_sampling="uniform",  # uniform | logit_normal
    ))

    # Stage 1 (docs/method.md, stage 1): MeanFlow distillation of the teacher into a one-step student.
    c.sketch = ml_collections.ConfigDict(dict(
        teacher_workdir="",  # work directory of the teacher stage (its newest checkpoint's ema_params)
        target="teacher",  # teacher: teacher's CFG velocity | data: eps - x (MeanFlow from scratch)
        cfg_scale=1.0,  # guidance of the teacher target, applied for t in [cfg_t_min, cfg_t_max]
        cfg_t_min=0.0,
        cfg_t_max=1.0,
        fraction_r_neq_t=0.25,
        # Share of the batch (inside the r != t share) trained on the one-step jump (r, t) = (0, 1) itself.
        fraction_one_step=0.0,
        time_mean=-0.4,  # logit-normal (t, r) draws
        time_std=1.0,
        adaptive_p=1.0,  # loss = mean(d2 / sg(d2 + c)^p)
        adaptive_c=1e-2,
        label_dropout=0.1,
    ))

    # Stage 2 (docs/method.md, stage 2): DMD with an adversarial head, starting from the sketch.
    c.refine = ml_collections.ConfigDict(dict(
        teacher_workdir="",  # frozen real score; the fake score starts as a copy
        sketch_workdir="",  # generator initialisation (its ema_params)
        generator_init="sketch",  # sketch | teacher (the no-sketch baseline)
        real_cfg_scale=1.5,
        t_min=0.02,
        t_max=0.98,
        generator_every=5,  # two time-scale update: the critic updates every step, the generator every k-th
        critic_lr=1e-4,
        gan_head="awd",  # awd | gap | conv | none
        awd_weighting="attention",  # attention | logit
        awd_heads=1,
        awd_temperature=1.0,
        head_width=128,
        feature_net="fake_score",  # fake_score (DMD2) | teacher (LADD-style)
        feature_block=-1,  # block whose tokens the head reads; -1 = the middle block
        gan_weight_generator=3e-3,
        gan_weight_critic=1e-2,
    ))

    # Evaluation (stage 'eval'): rows of (model, sampler, steps) scored with one feature network.
    c.eval = ml_collections.ConfigDict(dict(
        teacher_workdir="",
        students="",  # one-step generators: "sketch=DIR,refine=DIR"
        teacher_euler_steps=(1, 2, 4, 8, 16, 32, 64, 128),
        teacher_heun_steps=(2, 4, 8),
        student_steps=(1, 2),
        cfg_scale=1.5,  # teacher sampling guidance
        num_samples=5000,
        batch_size=500,
        feature_net="classifier",  # classifier (trained here, cached) | inception (weights file)
        classifier_steps=1500,
        # Where a trained stage's in-training scorer (eval_every) caches its classifier; '' = WORKDIR/eval.
        # hd.pipeline points every stage at the evaluation's directory: one classifier for the whole run.
        feature_dir="",
        inception_weights="",
        inception_sha256="",
        reference_npz="",  # ADM-style statistics (mu, sigma); '' = features of the test split
        nearest_k=3,
        # Inception evaluation (hd.eval.evaluator.evaluate_inception; README "Reproducing the paper on ImageNet-256"):
        vae_dir="",  # diffusers AutoencoderKL folder: samples are latents, decoded (latents / scaling_factor)
        vae_sha256="",  # expected sha256 of the VAE's safetensors file ('' = not checked)
        export_npz="",  # also write the samples as an ADM evaluator .npz (arr_0 uint8 NHWC, arr_1 labels)
        guidance_scales=(),  # one teacher row per scale; () = just cfg_scale
        chunk_size=0,  # samples per saved (resumable) chunk, a multiple of batch_size; 0 = 10 batches
        inception_splits=10,  # Inception Score over this many equal splits (10 = ADM / improved-GAN)
    ))

    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 1000  # 0 = only at the end
    c.eval_every = 0  # > 0: score samples of the stage's sampler with config.eval's feature net (TensorBoard eval/*)
    c.sample = ml_collections.ConfigDict(dict(
        num_steps=32, method="euler", cfg_scale=1.0, per_class=8,
        # Latent data: grids are decoded by this diffusers AutoencoderKL folder (latents / its scaling_factor,
        # which must equal data.latent_scale) and shown as RGB images; '' = grids show the data as it is.
        vae_dir="",
        vae_sha256="",  # expected sha256 of the VAE's safetensors file ('' = not checked)
    ))
    return c


# --- dotted keys ('refine.critic_lr'): the one walker every helper below goes through ---------------------

def _parent(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    return node, leaf


def get_value(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node, leaf = _parent(config, dotted)
    return node[leaf]


def set_values(config: ml_collections.ConfigDict, updates: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys in place (a locked config rejects a key it lacks, naming it) and returns `config`."""
    for dotted, value in updates.items():
        node, leaf = _parent(config, dotted)
        node[leaf] = value
    return config


def copy_with(config: ml_collections.ConfigDict, updates: dict[str, Any]) -> ml_collections.ConfigDict:
    """An unlocked copy of `config` with dotted keys replaced."""
    return set_values(ml_collections.ConfigDict(config.to_dict()), updates)


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of `config`, groups included ('refine', 'refine.critic_lr', ...)."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += dotted_keys(value, prefix + name + ".")
    return keys


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", tuple: "a tuple such as (1, 2)",
               str: "a string"}


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """KEY=VALUE strings on a locked config, each parsed as `--config.KEY=VALUE` is (ml_collections' flag
    parsers for the field's type: so `--set` and hd.main accept and reject the same values)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. --set num_steps=300)")
        try:
            expected = config_path.get_type(key, config)
        except (AttributeError, KeyError):
            close = difflib.get_close_matches(key, dotted_keys(config), n=3)
            raise ValueError(f"--set {item}: the config has no key {key!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")) from None
        if isinstance(expected, type) and issubclass(expected, ml_collections.ConfigDict):
            raise ValueError(f"--set {item}: {key!r} is a group of keys; set its fields one by one "
                             f"({', '.join(k for k in dotted_keys(config) if k.startswith(key + '.'))})")
        values = flags.FlagValues()  # a private flag set: parsing leaves the program's own flags alone
        argv = ["hd.pipeline", f"--set.{key}={raw}"]
        holder = config_flags.DEFINE_config_dict("set", config, flag_values=values, sys_argv=argv)
        try:
            values(argv)
        except flags.Error as e:
            raise ValueError(f"--set {key}={raw}: {raw!r} is not {_TYPE_WORDS.get(expected, expected.__name__)}, "
                             f"the type of {key} ({e})") from None
        config = holder.value
    return config


# --- values derived from the config: computed here, never written back into it ----------------------------

def feature_block(config: ml_collections.ConfigDict) -> int:
    """The block whose tokens the refine stage's head reads: refine.feature_block, -1 = the middle block."""
    from hd.models import model_depth  # local: keeps config import light (no flax for config files)

    block = config.refine.feature_block
    return model_depth(config.model) // 2 if block == -1 else block


def critic_optimizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The critic's optimizer settings: config.optimizer at the learning rate refine.critic_lr."""
    return copy_with(config.optimizer, {"lr": config.refine.critic_lr})


def _positive(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = get_value(config, key)
        if not value > 0:
            raise ValueError(f"config.{key}={value!r} must be > 0 (an integer division that rounded to 0?)")


def check_example_shape(data_cfg: ml_collections.ConfigDict, dataset_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The example shape to build networks for: the dataset's, which must equal `data.example_shape` when that
    is set (a compile check run from the config alone must have seen the shape training will see)."""
    configured, dataset_shape = tuple(data_cfg.example_shape), tuple(int(s) for s in dataset_shape)
    if configured and configured != dataset_shape:
        raise ValueError(f"config.data.example_shape={configured} but the dataset's examples have shape "
                         f"{dataset_shape}: fix the config (or set it to () to take the dataset's)")
    return dataset_shape


# Keys that may change when a run resumes: how long and how fast it trains, how often it logs, saves, samples
# and scores, where it reads its data and sources from, and how the same arrays are laid out over devices.
# Every other key defines the run (its parameter shapes, data, batch, random stream, objective): changing one
# on resume is an error (see run_defining_changes). A new key defines the run until it is listed here.
RESUMABLE_KEYS = (
    "num_steps", "restore_step", "allow_unfinished_sources", "optimizer.*", "ema_decay", "max_consecutive_skips",
    "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "eval_every", "sample.*", "eval.*",
    "mesh.*", "sharding_rules", "model.remat", "model.scan_blocks", "data.data_dir", "data.idx_dir",
    "data.max_in_memory_mb", "data.example_shape", "sketch.teacher_workdir", "refine.teacher_workdir",
    "refine.sketch_workdir", "refine.critic_lr",
)


def flat_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict (config.to_dict() or a parsed config.json); lists are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (stored value, new value)} for every schema key whose value differs from a stored
    config.json. Values are compared as JSON (tuples as lists); a key the stored file lacks (written before the
    key existed) is not a change, nor is a stored key the schema no longer has (e.g. `sources`)."""
    old = flat_config(stored)
    new = flat_config(json.loads(config.to_json_best_effort()))
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}


def run_defining_changes(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    return {k: v for k, v in changes.items() if not is_resumable(k)}


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise ValueError naming the key and the fix for any value that cannot work, or any hand-off the stage
    needs and the config does not name."""
    check_values(config, num_devices)
    check_hand_offs(config)


def check_hand_offs(config: ml_collections.ConfigDict) -> None:
    """The work directories of earlier stages that config.stage reads are named (not opened: what they hold is
    checked when the stage is built). Tools that build a stage around abstract or random trees skip this."""
    if config.stage == "sketch" and config.sketch.target == "teacher" and not config.sketch.teacher_workdir:
        raise ValueError("config.sketch.teacher_workdir is empty: set it to the work directory of a finished "
                         "teacher stage (or use --config.sketch.target=data to train from data alone)")
    if config.stage == "refine":
        rf = config.refine
        if not rf.teacher_workdir:
            raise ValueError("config.refine.teacher_workdir is empty: set it to the work directory of a finished "
                             "teacher stage (the real score)")
        if rf.generator_init == "sketch" and not rf.sketch_workdir:
            raise ValueError("config.refine.sketch_workdir is empty: set it to a finished sketch stage, or use "
                             "--config.refine.generator_init=teacher for the no-sketch baseline")
    if config.stage == "eval" and not config.eval.teacher_workdir and not config.eval.students:
        raise ValueError("config.eval: set teacher_workdir and/or students=NAME=DIR,... to say what to score")


def check_values(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise ValueError naming the key and the fix for any value that cannot work (on `num_devices`)."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
    _positive(config, ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                       "optimizer.lr", "max_consecutive_skips", "sample.num_steps", "sample.per_class",
                       "data.num_classes", "model.patch_size", "model.width", "model.depth", "model.mlp_ratio"))
    if config.restore_step < -1:
        raise ValueError(f"config.restore_step={config.restore_step} must be a checkpoint step, or 0 / -1 for the "
                         "newest")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
    if config.optimizer.warmup_steps < 0 or config.sample_every < 0 or config.eval_every < 0:
        raise ValueError("config.optimizer.warmup_steps, config.sample_every and config.eval_every must be >= 0")
    if config.eval_every:
        _positive(config, ("eval.num_samples", "eval.classifier_steps", "eval.nearest_k"))
    if config.data.name not in ("fashion_mnist", "tfds", "toy2d"):
        raise ValueError(f"config.data.name={config.data.name!r} is not one of 'fashion_mnist', 'tfds', 'toy2d'")
    if config.data.name == "tfds" and not config.data.tfds_name:
        raise ValueError("config.data.name='tfds' needs config.data.tfds_name (a prepared TFDS dataset)")
    if config.model.name not in ("dit", "mlp"):
        raise ValueError(f"config.model.name={config.model.name!r} is not one of 'dit', 'mlp'")
    if (config.model.name == "mlp") != (config.data.name == "toy2d"):
        raise ValueError(f"config.model.name={config.model.name!r} does not fit config.data.name="
                         f"{config.data.name!r}: use 'mlp' for toy2d and 'dit' for images")
    from hd.models.dit import DIT_SIZES  # local: keeps config import light
    if config.model.name == "dit" and config.model.size not in DIT_SIZES:
        raise ValueError(f"config.model.size={config.model.size!r} is not one of {tuple(DIT_SIZES)}")
    for key in ("remat", "scan_blocks"):
        if config.model[key] and config.model.name != "dit":
            raise ValueError(f"config.model.{key}=True is implemented for the DiT only, not model.name="
                             f"{config.model.name!r}")
    example_shape = tuple(config.data.example_shape)
    if example_shape:
        rank = 1 if config.model.name == "mlp" else 3
        if len(example_shape) != rank or not all(isinstance(s, int) and s > 0 for s in example_shape):
            raise ValueError(f"config.data.example_shape={example_shape} must be () (take it from the dataset) or "
                             f"{'(D,)' if rank == 1 else '(H, W, C)'} of positive integers for model.name="
                             f"{config.model.name!r}")
        if rank == 3 and example_shape[0] != example_shape[1]:
            raise ValueError(f"config.data.example_shape={example_shape}: the DiT takes square images (H == W)")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={config.model.dtype!r} is not 'float32' or 'bfloat16'")
    if config.sample.method not in ("euler", "heun"):
        raise ValueError(f"config.sample.method={config.sample.method!r} is not 'euler' or 'heun'")
    if config.teacher.time_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"config.teacher.time_sampling={config.teacher.time_sampling!r} is not "
                         "'uniform' or 'logit_normal'")
    if not 0.0 <= config.teacher.label_dropout < 1.0:
        raise ValueError(f"config.teacher.label_dropout={config.teacher.label_dropout} must be in [0, 1)")
    if config.stage == "sketch":
        sk = config.sketch
        if sk.target not in ("teacher", "data"):
            raise ValueError(f"config.sketch.target={sk.target!r} is not 'teacher' or 'data'")
        if not 0.0 <= sk.fraction_r_neq_t <= 1.0:
            raise ValueError(f"config.sketch.fraction_r_neq_t={sk.fraction_r_neq_t} must be in [0, 1]")
        if not 0.0 <= sk.fraction_one_step <= sk.fraction_r_neq_t:
            raise ValueError(f"config.sketch.fraction_one_step={sk.fraction_one_step} must be in [0, "
                             f"fraction_r_neq_t={sk.fraction_r_neq_t}] (the one-step rows are r != t rows)")
        if not 0.0 <= sk.cfg_t_min <= sk.cfg_t_max <= 1.0:
            raise ValueError(f"config.sketch.cfg_t_min={sk.cfg_t_min}, cfg_t_max={sk.cfg_t_max} must satisfy "
                             "0 <= min <= max <= 1")
        if sk.time_std <= 0 or sk.adaptive_c <= 0 or sk.adaptive_p < 0:
            raise ValueError("config.sketch.time_std and adaptive_c must be > 0, adaptive_p >= 0")
    if config.stage == "refine":
        rf = config.refine
        if rf.generator_init not in ("sketch", "teacher"):
            raise ValueError(f"config.refine.generator_init={rf.generator_init!r} is not 'sketch' or 'teacher'")
        if rf.gan_head not in ("awd", "gap", "conv", "none"):
            raise ValueError(f"config.refine.gan_head={rf.gan_head!r} is not one of 'awd', 'gap', 'conv', 'none'")
        if rf.awd_weighting not in ("attention", "logit"):
            raise ValueError(f"config.refine.awd_weighting={rf.awd_weighting!r} is not 'attention' or 'logit'")
        if rf.feature_net not in ("fake_score", "teacher"):
            raise ValueError(f"config.refine.feature_net={rf.feature_net!r} is not 'fake_score' or 'teacher'")
        if not 0.0 <= rf.t_min < rf.t_max <= 1.0:
            raise ValueError(f"config.refine.t_min={rf.t_min}, t_max={rf.t_max} must satisfy 0 <= min < max <= 1")
        _positive(config, ("refine.generator_every", "refine.critic_lr", "refine.awd_heads",
                           "refine.awd_temperature", "refine.head_width"))
        from hd.models import model_depth  # local: keeps config import light (no flax for config files)

        depth = model_depth(config.model)
        if not -1 <= rf.feature_block < depth:
            raise ValueError(f"config.refine.feature_block={rf.feature_block} is outside the model's {depth} "
                             "blocks (-1 = the middle one)")
    if config.stage == "eval":
        ev = config.eval
        if ev.feature_net not in ("classifier", "inception"):
            raise ValueError(f"config.eval.feature_net={ev.feature_net!r} is not 'classifier' or 'inception'")
        if ev.feature_net == "inception" and not ev.inception_weights:
            raise ValueError("config.eval.feature_net='inception' needs config.eval.inception_weights (a converted "
                             "weights file; see README) and, to pin it, config.eval.inception_sha256")
        _positive(config, ("eval.num_samples", "eval.batch_size", "eval.classifier_steps", "eval.nearest_k"))
        if ev.num_samples % ev.batch_size or ev.batch_size % num_devices:
            raise ValueError(f"config.eval.num_samples={ev.num_samples} must be a multiple of config.eval.batch_size="
                             f"{ev.batch_size}, itself a multiple of the {num_devices} devices")
        if any(n < 1 for n in (*ev.teacher_euler_steps, *ev.teacher_heun_steps, *ev.student_steps)):
            raise ValueError("config.eval step counts must all be >= 1")
    for regex, rule in config.sharding_rules:
        if rule not in ("fsdp", "replicate"):
            raise ValueError(f"config.sharding_rules: rule {rule!r} for {regex!r} is not 'fsdp' or 'replicate'")

    data, fsdp = config.mesh.data, config.mesh.fsdp
    if (data == -1 and fsdp == -1) or min(data, fsdp) < -1 or 0 in (data, fsdp):
        raise ValueError(f"config.mesh=(data={data}, fsdp={fsdp}): each axis is a positive size or -1, "
                         "and at most one is -1")
    fixed = (data if data != -1 else 1) * (fsdp if fsdp != -1 else 1)
    if num_devices % fixed or (-1 not in (data, fsdp) and fixed != num_devices):
        raise ValueError(f"config.mesh=(data={data}, fsdp={fsdp}) does not fit {num_devices} devices: "
                         "the product must equal the device count (use -1 for one axis)")
    if config.batch_size % num_devices:
        raise ValueError(f"config.batch_size={config.batch_size} does not divide over {num_devices} devices: "
                         f"use a multiple of {num_devices}")
