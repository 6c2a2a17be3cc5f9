"""The latent pipeline in miniature, for CI (tests/test_latent_pipeline.py): the paper's ImageNet-256 setting
(configs/imagenet256.py) with every size cut down so that all stages run in seconds on 2 CPU cores.

Data: 32x32 RGB images encoded by a tiny AutoencoderKL (4x downsampling, scaling_factor 0.5) into 8x8x4
posteriors by `python -m hd.data.prepare_latents --source=folder:DIR --vae=VAE --out=DATA_DIR --resolution=32
--name=tiny_latents`; set data.data_dir to DATA_DIR. Every visit draws a fresh latent (mean + std * noise) * 0.5
and one of the two stored flips, as the ImageNet configs do with the SD-VAE's 0.18215.

Variants: teacher, sketch, refine, eval (also named tiny, sketch_tiny, refine_tiny, eval_tiny, so
`python -m hd.pipeline` runs it with either --profile). The eval variant scores with an Inception network
(config.eval.inception_weights) on decoded samples (config.eval.vae_dir) against the FID statistics
prepare_latents wrote (config.eval.reference_npz); all three are files you pass.
"""

from hd.config import base_config, parse_variant


def get_config(variant: str = "teacher"):
    stage, _ = parse_variant("configs/latent_tiny.py", variant, sizes=("tiny",))  # one size: tiny = the default
    c = base_config()
    c.stage = stage

    c.data.name = "tfds"
    c.data.tfds_name = "tiny_latents"
    c.data.data_dir = ""  # where prepare_latents wrote it (--out)
    c.data.split = "train"
    c.data.num_classes = 10
    c.data.example_shape = (8, 8, 4)  # 32 / 4 (the tiny VAE's downsampling), 4 latent channels
    c.data.latent_posterior = True
    c.data.latent_scale = 0.5  # the tiny VAE's scaling_factor (checked against the dataset)

    c.model.name = "dit"
    c.model.size = "tiny"
    c.model.patch_size = 2  # 4 x 4 = 16 tokens

    c.batch_size = 16
    c.num_steps = 6
    c.log_every = 2
    c.checkpoint_every = 3
    c.sample_every = 0
    c.sample.per_class = 1
    c.sample.cfg_scale = 1.5
    c.optimizer.warmup_steps = 0
    if stage == "teacher":
        c.optimizer.lr = 1e-3
        c.sample.num_steps = 2
    elif stage == "sketch":
        c.optimizer.lr = 2e-4
        c.sketch.cfg_scale = 1.5
        c.sample.num_steps = 1
    elif stage == "refine":
        c.optimizer.lr = 3e-4
        c.refine.generator_every = 2
        c.refine.critic_lr = 6e-4
        c.sample.num_steps = 1
    else:  # eval: one teacher row and the one-step students, a few Inception-scored samples each
        c.eval.feature_net = "inception"
        c.eval.num_samples = 10  # Inception at 299 px costs ~0.5 s per image on 2 CPU cores
        c.eval.batch_size = 10
        c.eval.chunk_size = 10
        c.eval.inception_splits = 2
        c.eval.nearest_k = 3
        c.eval.cfg_scale = 1.5
        c.eval.teacher_euler_steps = (2,)
        c.eval.teacher_heun_steps = ()
        c.eval.student_steps = (1,)
    c.lock()
    return c
