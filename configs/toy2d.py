"""2-D toy distributions (8 Gaussians, checkerboard) with an MLP: seconds per stage on a CPU.

Variants: teacher, tiny (a few steps, for tests).
"""

from hd.config import base_config


def get_config(variant: str = "teacher"):
    c = base_config()
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
    c.teacher.label_dropout = 0.1
    c.log_every = 100
    c.checkpoint_every = 1000
    c.sample_every = 1000
    c.sample.num_steps = 64

    if variant == "teacher":
        pass
    elif variant == "tiny":
        c.model.width = 64
        c.model.depth = 2
        c.batch_size = 64
        c.num_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.sample.num_steps = 4
    elif variant == "sketch":
        c.stage = "sketch"
        c.num_steps = 3000
        c.optimizer.lr = 1e-3
        c.sketch.cfg_scale = 1.0
        c.sample.num_steps = 1
    elif variant == "sketch_tiny":
        c.stage = "sketch"
        c.model.width = 64
        c.model.depth = 2
        c.batch_size = 64
        c.num_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.sample.num_steps = 1
    elif variant == "refine":
        c.stage = "refine"
        c.num_steps = 2000
        c.optimizer.lr = 1e-4
        c.optimizer.warmup_steps = 0
        c.refine.critic_lr = 1e-3
        c.refine.real_cfg_scale = 1.0
        c.sample.num_steps = 1
    elif variant == "refine_tiny":
        c.stage = "refine"
        c.model.width = 64
        c.model.depth = 2
        c.batch_size = 64
        c.num_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.sample.num_steps = 1
        c.refine.generator_every = 2
    elif variant in ("eval", "eval_tiny"):
        c.stage = "eval"
        c.eval.num_samples = 2000
        c.eval.batch_size = 500
        c.eval.classifier_steps = 500
        c.eval.cfg_scale = 1.0
        c.eval.teacher_euler_steps = (1, 2, 4, 8, 16, 32, 64)
        c.eval.teacher_heun_steps = (2, 4, 8)
        if variant == "eval_tiny":
            c.model.width = 64
            c.model.depth = 2
            c.eval.num_samples = 200
            c.eval.batch_size = 100
            c.eval.classifier_steps = 50
            c.eval.teacher_euler_steps = (1, 4)
            c.eval.teacher_heun_steps = (2,)
    else:
        raise ValueError(f"configs/toy2d.py has no variant {variant!r}; use one of: teacher, tiny, sketch, sketch_tiny, refine, refine_tiny, eval, eval_tiny")
    c.lock()
    return c
