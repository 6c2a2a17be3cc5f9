"""2-D toy distributions (8 Gaussians by default; checkerboard, moons) with an MLP: seconds per stage on a CPU.

Variants: STAGE or STAGE_tiny for STAGE in teacher, sketch, refine, eval ("tiny" alone is the tiny teacher).
"""

from hd.config import base_config, parse_variant


def get_config(variant: str = "teacher"):
    stage, size = parse_variant("configs/toy2d.py", variant, sizes=("tiny",))
    c = base_config()
    c.stage = stage
    c.data.name = "toy2d"
    c.data.toy = "8gaussians"
    c.data.num_classes = 8
    c.model.name = "mlp"
    c.model.width = 256
    c.model.depth = 4
    c.batch_size = 512
    c.num_steps = 3000
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.995
    c.log_every = 100
    c.checkpoint_every = 1000
    c.sample_every = 1000
    c.sample.num_steps = 64

    if stage == "sketch":
        c.optimizer.lr = 1e-3
        c.sample.num_steps = 1
    elif stage == "refine":
        c.num_steps = 2000
        c.optimizer.lr = 1e-4
        c.optimizer.warmup_steps = 0
        c.refine.critic_lr = 1e-3
        c.refine.real_cfg_scale = 1.0
        c.sample.num_steps = 1
    elif stage == "eval":
        c.eval.num_samples = 2000
        c.eval.batch_size = 500
        c.eval.classifier_steps = 500
        c.eval.cfg_scale = 1.0
        c.eval.teacher_euler_steps = (1, 2, 4, 8, 16, 32, 64)

    if size == "tiny":
        c.model.width = 64
        c.model.depth = 2
        c.batch_size = 64
        c.num_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.sample.num_steps = min(c.sample.num_steps, 4)
        c.refine.generator_every = 2
        c.eval.num_samples = 200
        c.eval.batch_size = 100
        c.eval.classifier_steps = 50
        c.eval.teacher_euler_steps = (1, 4)
        c.eval.teacher_heun_steps = (2,)
    c.lock()
    return c
