"""DiT options that must not change what is computed: fused attention (config.model.attention) and bfloat16
compute (config.model.dtype) with float32 parameters and optimizer states, in every stage."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hd import bench
from hd.models import average_velocity_apply, build_model, init_params, velocity_apply
from hd.models import dit
from hd.train import steps
from hd.train.stages import student_from_teacher
from hd.train.state import TrainState, make_optimizer
from tests.conftest import load_config

SHAPE = (28, 28, 1)


def _config(**overrides):
    return load_config("fashion_mnist", "sketch_tiny", overrides)


def _params(config):
    model = build_model(config.model, SHAPE, config.data.num_classes)
    return bench.signal_params(jax.jit(lambda key: init_params(model, key, SHAPE))(jax.random.PRNGKey(0)))


def test_fused_attention_matches_plain_in_value_and_gradient():
    plain_cfg, fused_cfg = _config(), _config(**{"model.attention": "fused"})
    plain = build_model(plain_cfg.model, SHAPE, 10)
    fused = build_model(fused_cfg.model, SHAPE, 10)
    assert fused.attention == "fused" and plain.attention == "plain"
    params = _params(plain_cfg)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, jax.eval_shape(lambda: init_params(fused, jax.random.PRNGKey(0), SHAPE)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *SHAPE))
    t = jnp.linspace(0.1, 0.9, 4)
    y = jnp.arange(4, dtype=jnp.int32)

    def value_and_grad(model):
        loss = lambda p: jnp.mean(velocity_apply(model)(p, x, t, y) ** 2)
        return jax.jit(lambda p: (velocity_apply(model)(p, x, t, y), jax.grad(loss)(p)))(params)

    (out_p, grad_p), (out_f, grad_f) = value_and_grad(plain), value_and_grad(fused)
    assert float(jnp.std(out_p)) > 1e-3  # the outputs carry signal
    chex.assert_trees_all_close(out_f, out_p, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grad_f, grad_p, rtol=1e-4, atol=1e-7)


def _without_jvp_rule(q, k, v):
    """Fused attention as cuDNN's kernel behaves: a custom VJP and no forward-mode rule."""

    @jax.custom_vjp
    def attend(q, k, v):
        return dit.attention(q, k, v)

    attend.defvjp(lambda q, k, v: (dit.attention(q, k, v), (q, k, v)),
                  lambda res, g: jax.vjp(dit.attention, *res)[1](g))
    return attend(q, k, v)


def test_sketch_with_fused_attention_runs_plain_attention_in_the_student(monkeypatch):
    """jax.jvp cannot pass a kernel without a forward-mode rule; the student (average_velocity_apply) runs plain
    attention, so the sketch step with attention='fused' computes what it computes with 'plain'."""
    monkeypatch.setattr(dit, "fused_attention", _without_jvp_rule)
    plain_cfg, fused_cfg = _config(), _config(**{"model.attention": "fused"})
    teacher = _params(plain_cfg)
    fused = build_model(fused_cfg.model, SHAPE, 10)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *SHAPE))
    t, y = jnp.full((4,), 0.5), jnp.arange(4, dtype=jnp.int32)
    # The stand-in really lacks a jvp rule: through the fused network's velocity, jax.jvp fails...
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda z: velocity_apply(fused)(teacher, z, t, y), (x,), (x,))
    # ... but not through the average-velocity network, which runs plain attention.
    jax.jvp(lambda z: average_velocity_apply(fused)(teacher, z, t * 0, t, y), (x,), (x,))

    batch = bench.random_batch(plain_cfg, SHAPE)
    results = []
    for config in (plain_cfg, fused_cfg):
        model = build_model(config.model, SHAPE, 10)
        optimizer = make_optimizer(config.optimizer)
        state = TrainState.create(student_from_teacher(teacher), optimizer)
        step = jax.jit(lambda s, b, tp, m=model, o=optimizer, c=config: steps.sketch_step(
            s, b, tp, model=m, optimizer=o, config=c))
        results.append(step(state, batch, teacher))
    (state_p, metrics_p), (state_f, metrics_f) = results
    assert float(metrics_p["grad_norm"]) > 0
    chex.assert_trees_all_close(metrics_f, metrics_p, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(state_f.params, state_p.params, rtol=1e-4, atol=1e-6)


def test_unknown_attention_is_a_clear_error():
    model = build_model(_config(**{"model.attention": "flash"}).model, SHAPE, 10)
    with pytest.raises(ValueError, match="config.model.attention"):
        jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), SHAPE))


def test_bfloat16_compute_trains_every_stage_with_float32_state():
    """Teacher step, sketch step (its jax.jvp) and a refine cycle (generator and critic updates) in bfloat16:
    finite, the parameters move, and parameters and optimizer states stay float32."""
    config = _config(**{"model.dtype": "bfloat16", "model.attention": "fused", "refine.generator_every": 1})
    entries = bench.train_steps(config, SHAPE)
    assert set(entries) == {"teacher", "sketch", "refine_k1"}
    for name, (fn, args) in entries.items():
        if name == "sketch":  # a fresh DiT outputs exactly 0, and so would every MeanFlow gradient
            teacher = bench.signal_params(args[2])
            student = jax.jit(student_from_teacher)(teacher)
            args = (args[0].replace(params=student, ema_params=jax.tree.map(jnp.copy, student)), args[1], teacher)
        before = jax.tree.map(np.asarray, args[0])
        step = jax.jit(fn)
        state, metrics = step(*args)
        state, metrics = step(state, *args[1:])  # the learning-rate warm-up starts at 0
        assert all(np.all(np.isfinite(np.asarray(m))) for m in jax.tree.leaves(metrics)), name
        assert float(state.total_skips) == 0, name
        floats = [a for a in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
                  if jnp.issubdtype(a.dtype, jnp.floating)]
        assert floats and all(a.dtype == jnp.float32 for a in floats), name
        moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before.params)
        assert max(jax.tree.leaves(moved)) > 0, name
        if name.startswith("refine"):
            critic = jax.tree.leaves((state.critic_params, state.critic_opt_state))
            assert all(a.dtype == jnp.float32 for a in critic if jnp.issubdtype(a.dtype, jnp.floating))


def test_bfloat16_sketch_target_and_dmd_gradient_errors():
    """Relative errors of bfloat16 compute against float32 on the same parameters and inputs (printed for the
    record). bfloat16 keeps 8 significand bits (relative rounding 2^-9 = 0.2 %): errors of a few times that
    per layer are expected, and exactly 0 would mean bfloat16 was never used."""
    errors = bench.precision_errors(_config(), SHAPE)
    print("bfloat16 vs float32 relative errors:", {k: round(v, 4) for k, v in errors.items()})
    for key in ("sketch_target", "sketch_velocity", "sketch_du_dt"):
        assert 1e-4 < errors[key] < 0.05, (key, errors[key])
    assert 1e-3 < errors["dmd_gradient"] < 0.5
    # At refine's first step (fake score = teacher) g is the CFG term alone, below bfloat16's resolution of the
    # two outputs it is the difference of: recorded, not bounded.
    assert np.isfinite(errors["dmd_gradient_fake_is_teacher"])
