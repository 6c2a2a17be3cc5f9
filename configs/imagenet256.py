"""ImageNet 256x256, class-conditional, in SD-VAE latent space (32x32x4, 1000 classes): SiT-XL/2-sized teacher
and students, batch 256, bfloat16 compute, fully sharded over a TPU slice.

Variants: teacher, sketch (stage 1), refine (stage 2).

Data: a TFDS dataset of pre-computed latents that you prepare (data.tfds_name, ArrayRecord format) with the
latent array under data.image_key (float, already multiplied by the VAE's scale factor; float features are
read as they are, uint8 ones mapped to [-1, 1]) and the class under data.label_key. It is not on this machine: the shape is
given by data.example_shape, so `python -m hd.compile_check --config=configs/imagenet256.py:sketch
--topology=v4:2x2x4` lowers and compiles the real step for a TPU slice without it (README, "TPU compile check").

Mesh: (data=1, fsdp=-1), every chip of the slice on the fsdp axis. The parameters, EMA and AdamW moments of
each network (student/generator, frozen teacher, fake score, discriminator head) are split 1/N over the N chips
(ZeRO-3 / FSDP: all-gathered per use), which is what lets XL/2 with its optimizer state fit a 16 GiB v5e chip;
batches are split over both axes anyway, so nothing is computed twice. XL's hidden size 1152 = 2^7 * 9 divides
every fsdp size up to 128 chips; on bigger slices use e.g. --config.mesh.data=-1 --config.mesh.fsdp=64.
"""

from hd.config import base_config

STAGES = ("teacher", "sketch", "refine")


def get_config(variant: str = "teacher"):
    if variant not in STAGES:
        raise ValueError(f"configs/imagenet256.py has no variant {variant!r}; use one of {STAGES}")
    c = base_config()
    c.stage = variant

    c.data.name = "tfds"
    c.data.tfds_name = "imagenet256_latents"  # prepared by you: SD-VAE latents of the 256x256 center crops
    c.data.data_dir = ""  # $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.split = "train"
    c.data.image_key = "latent"
    c.data.label_key = "label"
    c.data.num_classes = 1000
    c.data.example_shape = (32, 32, 4)  # 256 / 8 (SD-VAE downsampling), 4 latent channels

    c.model.name = "dit"
    c.model.size = "XL"  # 1152 hidden, 28 blocks, 16 heads: ~675 M parameters
    c.model.patch_size = 2  # 16 x 16 = 256 tokens
    c.model.dtype = "bfloat16"  # compute; parameters and optimizer states stay float32
    # The 28 blocks run as one scan over their stacked parameters (same parameter tree as unrolled): XL/2 steps
    # unrolled take the TPU compiler > 16 GB of host memory; scanned, ~4 GB and a few minutes. A scan keeps every
    # block's intermediates for the backward pass (5x the unrolled temporaries, measured on B/2), so each block
    # is rematerialised: ~1 extra forward per step (README, "TPU compile check").
    c.model.scan_blocks = True
    c.model.remat = True

    c.mesh.data = 1
    c.mesh.fsdp = -1
    # Every kernel and embedding table (all large leaves) of every tree is split over fsdp: the state's params,
    # ema_params and opt_state (mu and nu mirror the parameter paths), the refine critic (critic_params/
    # fake_score/..., critic_params/head/..., critic_opt_state) and the frozen teacher. Biases, LayerNorm and the
    # AWD query (< 0.1 % of the bytes) stay replicated.
    c.sharding_rules = (("(^|.*/)(kernel|embedding)$", "fsdp"), (".*", "replicate"))

    c.batch_size = 256
    c.log_every = 100
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    c.sample_every = 20_000
    c.sample.per_class = 1  # 1000 classes: one sample each
    c.sample.cfg_scale = 1.5

    if variant == "teacher":  # SiT-XL/2: AdamW 1e-4, no weight decay, EMA 0.9999, label dropout 0.1
        c.num_steps = 400_000
        c.optimizer.lr = 1e-4
        c.optimizer.warmup_steps = 0
        c.optimizer.b2 = 0.999
        c.ema_decay = 0.9999
        c.teacher.label_dropout = 0.1
        c.sample.num_steps = 50
        c.sample.method = "heun"
    elif variant == "sketch":  # MeanFlow (design.md 1.3): Adam b2 0.95, lower rate when starting from a teacher
        c.num_steps = 100_000
        c.optimizer.lr = 2e-5
        c.optimizer.warmup_steps = 1000
        c.optimizer.b2 = 0.95
        c.ema_decay = 0.9999
        c.sketch.target = "teacher"
        c.sketch.cfg_scale = 1.5
        c.sample.num_steps = 1
    else:  # refine, DMD2 ImageNet (design.md 1.4): AdamW (0.9, 0.999), wd 0.01, 2e-6 both nets, clip 10, k = 5
        c.num_steps = 50_000
        c.optimizer.lr = 2e-6
        c.optimizer.warmup_steps = 0
        c.optimizer.b2 = 0.999
        c.optimizer.weight_decay = 0.01
        c.optimizer.grad_clip = 10.0
        c.ema_decay = 0.9999
        c.refine.critic_lr = 2e-6
        c.refine.generator_every = 5
        c.refine.real_cfg_scale = 1.5
        c.refine.gan_head = "awd"
        c.refine.feature_net = "fake_score"
        c.sample.num_steps = 1
    c.lock()
    return c
