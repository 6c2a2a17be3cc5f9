"""Fashion-MNIST (28x28x1, 10 classes) from the Debian package dataset-fashion-mnist.

Variants: STAGE, STAGE_tiny or STAGE_quality for STAGE in teacher, sketch, refine, eval ("tiny" or "quality"
alone is that teacher): the defaults fit the 20-minute CPU pipeline budget; the tiny ones run in seconds for
tests; the quality ones (hd.pipeline / hd.ablation --profile=quality) train every stage longer, within an hour
of 2 CPU cores, and score the refine stage during training. S and B are bigger teachers for accelerators.
"""

from hd.config import base_config, parse_variant


def get_config(variant: str = "teacher"):
    stage, size = parse_variant("configs/fashion_mnist.py", variant, sizes=("tiny", "quality", "S", "B"))
    c = base_config()
    c.stage = stage
    c.data.name = "fashion_mnist"
    c.data.num_classes = 10
    c.model.name = "dit"
    c.model.size = "mini"
    c.model.patch_size = 4
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 1000
    c.sample.cfg_scale = 1.5

    # Stage lengths fit the 20-minute CPU budget of the whole pipeline (2 cores); see README for the timings.
    # Batch 64 everywhere: at a fixed number of examples, twice the updates gave better one-step students
    # (sketch FD 10.6 vs 13.2 from half the examples; refine FD 1.40 vs 2.03 from the same examples).
    c.batch_size = 64
    if stage == "teacher":
        c.num_steps = 1200
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 100
        c.ema_decay = 0.995
        c.sample.num_steps = 32
        c.sample_every = 600
    elif stage == "sketch":
        c.num_steps = 300
        c.optimizer.lr = 2e-4
        c.optimizer.warmup_steps = 50
        c.ema_decay = 0.99
        c.sketch.cfg_scale = 1.5
        c.sketch.fraction_r_neq_t = 0.75  # the student starts as the teacher (exact at r = t): train the jumps
        # A quarter of each batch on the jump one-step sampling takes, (r, t) = (0, 1): logit-normal pairs almost
        # never span it. Sketch 1-step FD 7.40 -> 6.08, refine 1.29 -> 1.15 (README, "The one-step jump").
        c.sketch.fraction_one_step = 0.25
        c.sample.num_steps = 1
        c.sample_every = 150
    elif stage == "refine":
        c.num_steps = 250
        c.optimizer.lr = 3e-4
        c.optimizer.warmup_steps = 0
        c.ema_decay = 0.9
        c.refine.generator_every = 2
        c.refine.critic_lr = 6e-4
        c.refine.real_cfg_scale = 1.5
        c.sample.num_steps = 1
        c.sample_every = 125
        c.checkpoint_every = 50
    else:
        c.eval.num_samples = 1000
        c.eval.batch_size = 500
        # The feature classifier (hd.eval.classifier, trained once per work directory and cached): 4000 steps
        # at batch 128 reached 0.9118 test accuracy in 110 s of CPU time (400 steps of the older
        # pooled CNN: 0.788).
        c.eval.classifier_steps = 4000
        # The pipeline's teacher rows stop at 16 Euler steps (the 64-step row alone takes 4 minutes here); the
        # ablation (hd.ablation) scores the teacher up to 64 steps.
        c.eval.teacher_euler_steps = (1, 4, 16)
        c.eval.teacher_heun_steps = ()
        c.eval.student_steps = (1, 2)

    if size == "tiny":
        c.model.size = "tiny"
        c.model.patch_size = 7
        c.batch_size = 16
        c.num_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.sample_every = 0
        c.sample.num_steps = min(c.sample.num_steps, 2)
        c.sample.per_class = 2
        c.refine.generator_every = 2
        c.eval.num_samples = 200
        c.eval.batch_size = 100
        c.eval.classifier_steps = 20
        c.eval.teacher_euler_steps = (1, 4)
        c.eval.teacher_heun_steps = (2,)
    elif size == "quality":
        # 2.5x the teacher's and 2x the sketch's steps, 4x the refine steps; the refine stage is scored every 125
        # steps on the evaluation's features (same classifier recipe, so one cached classifier serves both).
        c.num_steps = {"teacher": 3000, "sketch": 600, "refine": 1000}.get(stage, c.num_steps)
        c.sample_every = {"teacher": 1000, "sketch": 300, "refine": 250}.get(stage, c.sample_every)
        if stage == "refine":
            c.checkpoint_every = 250
            c.eval_every = 125
            c.eval.num_samples = 1000
            c.eval.batch_size = 500
            c.eval.classifier_steps = 4000
        if stage == "eval":  # up to the teacher's best step counts (the ablation's teacher rows)
            c.eval.teacher_euler_steps = (1, 4, 16, 64)
            c.eval.teacher_heun_steps = (8,)
    elif size in ("S", "B"):
        c.model.size = size
        c.model.patch_size = 2
        c.batch_size = 256
        c.num_steps = 100_000
        c.optimizer.lr = 1e-4
        c.ema_decay = 0.9999
        c.checkpoint_every = 5000
        c.sample_every = 5000
    c.lock()
    return c
