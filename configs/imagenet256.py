"""ImageNet 256x256, class-conditional, in SD-VAE latent space (32x32x4, 1000 classes): SiT-XL/2-sized teacher
and students, batch 256, bfloat16 compute, fully sharded over a TPU slice.

Variants: teacher, sketch (stage 1), refine (stage 2), eval (FID-50K, Inception Score, precision/recall of the
teacher and the one-step students, decoded by the SD-VAE; README "Reproducing the paper on ImageNet-256").

Data: the SD-VAE posteriors of the ADM centre crops, prepared once by `python -m hd.data.prepare_latents
--source=tfds:imagenet2012 --vae=SD_VAE_DIR --out=DATA_DIR --name=imagenet256_latents --resolution=256` (TFDS
ArrayRecord: float16 mean and std of each image and of its horizontal flip, and the label; README "Reproducing
the paper on ImageNet-256"). Every visit of an image draws one flip with probability 1/2 and a fresh latent
(mean + std * noise) * 0.18215 seeded by (seed, step), so resume stays exact. Set data.data_dir to DATA_DIR
(or $TFDS_DATA_DIR). The data is not on this machine: the shape is given by data.example_shape, so `python -m hd.compile_check --config=configs/imagenet256.py:sketch
--topology=v4:2x2x4` lowers and compiles the real step for a TPU slice without it (README, "TPU compile check").

Mesh: (data=1, fsdp=-1), every chip of the slice on the fsdp axis. The parameters, EMA and AdamW moments of
each network (student/generator, frozen teacher, fake score, discriminator head) are split 1/N over the N chips
(ZeRO-3 / FSDP: all-gathered per use), which is what lets XL/2 with its optimizer state fit a 16 GiB v5e chip;
batches are split over both axes anyway, so nothing is computed twice. XL's hidden size 1152 = 2^7 * 9 divides
every fsdp size up to 128 chips; on bigger slices use e.g. --config.mesh.data=-1 --config.mesh.fsdp=64.
"""

from hd.config import base_config, parse_variant


def get_config(variant: str = "teacher"):
    variant, _ = parse_variant("configs/imagenet256.py", variant)
    c = base_config()
    c.stage = variant

    c.data.name = "tfds"
    c.data.tfds_name = "imagenet256_latents"  # hd.data.prepare_latents --name (SD-VAE posteriors, 256 px crops)
    c.data.data_dir = ""  # prepare_latents --out; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.split = "train"
    c.data.label_key = "label"
    c.data.num_classes = 1000
    c.data.example_shape = (32, 32, 4)  # 256 / 8 (SD-VAE downsampling), 4 latent channels
    c.data.latent_posterior = True  # draw (mean + std * noise) * latent_scale at every visit
    c.data.latent_scale = 0.18215  # sd-vae-ft-ema / -mse scaling_factor (DiT, SiT); checked against the dataset
    c.data.latent_flip = True  # ADM/DiT's random horizontal flip, from the stored flipped posterior

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
    # Set to the SD-VAE folder (prepare_latents --vae; + sample.vae_sha256 to pin it) for decoded RGB grids;
    # '' writes the raw 4-channel latents. It is on your machine, not in the config: pass it on the command line.
    c.sample.vae_dir = ""

    if variant == "teacher":  # SiT-XL/2: AdamW 1e-4, no weight decay, EMA 0.9999, label dropout 0.1
        c.num_steps = 400_000
        c.optimizer.lr = 1e-4
        c.optimizer.warmup_steps = 0
        c.optimizer.b2 = 0.999
        c.ema_decay = 0.9999
        c.teacher.label_dropout = 0.1
        c.sample.num_steps = 50
        c.sample.method = "heun"
    elif variant == "sketch":  # MeanFlow (docs/method.md, stage 1): Adam b2 0.95, lower rate when starting from a teacher
        c.num_steps = 100_000
        c.optimizer.lr = 2e-5
        c.optimizer.warmup_steps = 1000
        c.optimizer.b2 = 0.95
        c.ema_decay = 0.9999
        c.sketch.target = "teacher"
        c.sketch.cfg_scale = 1.5
        c.sample.num_steps = 1
    elif variant == "eval":
        # ADM's protocol: 50,000 samples (50 per class), FID against VIRTUAL_imagenet256_labeled.npz (mu, sigma
        # of the training set; its 10,000 images, arr_0, for precision/recall, k = 3), Inception Score over 10
        # splits of 5,000. The files are yours: set eval.teacher_workdir / eval.students, eval.vae_dir,
        # eval.inception_weights (+ sha256) and eval.reference_npz on the command line.
        c.eval.feature_net = "inception"
        c.eval.num_samples = 50_000
        # Global; 125 batches. 25 per chip on 16 chips: decode + Inception at 64 per chip take 10.3 GiB of a
        # v5e's 16 (README), 125 per chip would not fit; num_samples must be a multiple of it (hd.config.validate).
        c.eval.batch_size = 400
        c.eval.chunk_size = 4000  # 13 resumable chunks (the last one 2,000)
        c.eval.inception_splits = 10
        c.eval.nearest_k = 3
        c.eval.cfg_scale = 1.5  # SiT-XL/2's FID-50K setting
        c.eval.guidance_scales = ()  # e.g. --config.eval.guidance_scales='(1.0, 1.5)' for one teacher row each
        c.eval.teacher_euler_steps = (250,)  # the teacher's 250-step reference row (SiT reports 250 SDE steps)
        c.eval.teacher_heun_steps = ()
        c.eval.student_steps = (1,)  # HD's headline: one network evaluation
    else:  # refine, DMD2 ImageNet (docs/method.md, stage 2): AdamW (0.9, 0.999), wd 0.01, 2e-6 both nets, clip 10, k = 5
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
