"""Fashion-MNIST (28x28x1, 10 classes) from the Debian package dataset-fashion-mnist.

Variants: teacher (the CPU default), tiny (a few steps of a tiny DiT, for tests), S/B (bigger teachers for
accelerators).
"""

from hd.config import base_config


def get_config(variant: str = "teacher"):
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.num_classes = 10
    c.model.name = "dit"
    c.model.size = "mini"
    c.model.patch_size = 4
    c.batch_size = 128
    c.num_steps = 3000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 200
    c.ema_decay = 0.999
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 1000
    c.sample.num_steps = 32
    c.sample.cfg_scale = 1.5

    if variant == "teacher":
        pass
    elif variant == "tiny":
        c.model.size = "tiny"
        c.model.patch_size = 7
        c.batch_size = 16
        c.num_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.sample_every = 0
        c.sample.num_steps = 2
        c.sample.per_class = 2
    elif variant in ("S", "B"):
        c.model.size = variant
        c.model.patch_size = 2
        c.batch_size = 256
        c.num_steps = 100_000
        c.optimizer.lr = 1e-4
        c.ema_decay = 0.9999
        c.checkpoint_every = 5000
        c.sample_every = 5000
    elif variant == "sketch":
        c.stage = "sketch"
        c.num_steps = 2000
        c.optimizer.lr = 2e-4
        c.optimizer.warmup_steps = 100
        c.sketch.cfg_scale = 1.5
        c.sample.num_steps = 1
    elif variant == "sketch_tiny":
        c.stage = "sketch"
        c.model.size = "tiny"
        c.model.patch_size = 7
        c.batch_size = 16
        c.num_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.sample_every = 0
        c.sample.num_steps = 1
        c.sample.per_class = 2
    elif variant == "refine":
        c.stage = "refine"
        c.num_steps = 1000
        c.optimizer.lr = 2e-5
        c.optimizer.warmup_steps = 0
        c.refine.critic_lr = 2e-4
        c.refine.real_cfg_scale = 1.5
        c.sample.num_steps = 1
    elif variant == "refine_tiny":
        c.stage = "refine"
        c.model.size = "tiny"
        c.model.patch_size = 7
        c.batch_size = 16
        c.num_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.sample_every = 0
        c.sample.num_steps = 1
        c.sample.per_class = 2
        c.refine.generator_every = 2
    elif variant in ("eval", "eval_tiny"):
        c.stage = "eval"
        c.eval.num_samples = 5000
        c.eval.batch_size = 500
        if variant == "eval_tiny":
            c.model.size = "tiny"
            c.model.patch_size = 7
            c.eval.num_samples = 200
            c.eval.batch_size = 100
            c.eval.classifier_steps = 20
            c.eval.teacher_euler_steps = (1, 4)
            c.eval.teacher_heun_steps = (2,)
    else:
        raise ValueError(f"configs/fashion_mnist.py has no variant {variant!r}; use one of: teacher, tiny, sketch, sketch_tiny, refine, refine_tiny, eval, eval_tiny, S, B")
    c.lock()
    return c
