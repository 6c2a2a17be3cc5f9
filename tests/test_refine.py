"""Stage 2, refine (docs/method.md, stage 2): the DMD gradient against closed-form Gaussian scores, short DMD runs that
move a misplaced generator onto the target, the refine step's update isolation and two time-scale schedule,
the generator hand-off from the sketch (or the teacher), one short run through the training loop, and the
refine config checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from hd.checkpoint import Checkpointer, read_items
from hd.config import validate
from hd.data import make_batch_iterator
from hd.models import build_model
from hd.objectives.dmd import dmd_generator_loss
from hd.objectives.flow_matching import flow_matching_loss
from hd.train.stages import build_stage, init_params, student_from_teacher
from hd.train.state import RefineState, TrainState, make_optimizer

T_MIN, T_MAX = 0.02, 0.98


def _quick_compile(fn, *args):
    """fn compiled for args as one program without XLA's backend optimisations: the refine step then compiles
    ~5x faster on CPU; these tiny programs run in milliseconds either way."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


# --- Gaussians: z_t = (1 - t) x + t eps with x ~ N(m, s^2 I) has E[x | z_t] and the score in closed form. ---

def gaussian_velocity(mean, std):
    """The exact marginal velocity v(z_t, t) = (z_t - E[x | z_t]) / t of data N(mean, std^2 I)."""
    mean = jnp.asarray(mean, jnp.float32)

    def velocity(z, t, y):
        t = t.reshape(t.shape + (1,) * (z.ndim - 1))
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        posterior_mean = mean + (1 - t) * std ** 2 / var * (z - (1 - t) * mean)
        return (z - posterior_mean) / t

    return velocity


def _posterior_mean_np(z, t, mean, std):
    t = t.reshape(t.shape + (1,) * (z.ndim - 1))
    var = (1 - t) ** 2 * std ** 2 + t ** 2
    return mean + (1 - t) * std ** 2 / var * (z - (1 - t) * mean)


def _score_np(z, t, mean, std):
    """grad_z log p_t(z) for p_t = N((1 - t) mean, ((1 - t)^2 std^2 + t^2) I)."""
    t = t.reshape(t.shape + (1,) * (z.ndim - 1))
    return -(z - (1 - t) * mean) / ((1 - t) ** 2 * std ** 2 + t ** 2)


@pytest.mark.parametrize("shape", [(2,), (4, 4, 1)])
def test_dmd_gradient_is_the_reverse_kl_direction_on_gaussians(shape):
    """Data N(m_real, s^2 I), generator samples N(m_fake, s^2 I), both scores exact. The gradient of the DMD loss
    w.r.t. each sample is a positive multiple of the reverse-KL gradient (1 - t) (score_fake - score_real)(x_t),
    i.e. of m_fake - m_real, and equals (x_fake - x_real) / mean|x_g - x_real| / x_g.size exactly."""
    std, batch = 0.7, 256
    rng = np.random.default_rng(0)
    m_real = rng.normal(size=shape)
    m_fake = m_real + rng.normal(size=shape)
    x_g = (m_fake + std * rng.standard_normal((batch, *shape))).astype(np.float32)
    y = jnp.zeros((batch,), jnp.int32)
    key = jax.random.PRNGKey(42)

    def loss_and_grad(x):
        loss_fn = lambda x: dmd_generator_loss(x, y, key, real_velocity=gaussian_velocity(m_real, std),
                                               fake_velocity=gaussian_velocity(m_fake, std), t_min=T_MIN, t_max=T_MAX)
        return jax.value_and_grad(loss_fn, has_aux=True)(x)

    (loss, metrics), grad = _quick_compile(loss_and_grad, x_g)(x_g)
    grad = np.asarray(grad, np.float64).reshape(batch, -1)

    # Reference in float64 numpy, with t and the noise drawn as dmd_generator_loss documents: t ~ U[t_min, t_max]
    # from the first half of the key, the noise from the second.
    k_t, k_n = jax.random.split(key)
    t = np.asarray(jax.random.uniform(k_t, (batch,), minval=T_MIN, maxval=T_MAX), np.float64)
    noise = np.asarray(jax.random.normal(k_n, x_g.shape), np.float64)
    assert t.min() >= T_MIN and t.max() <= T_MAX
    x = x_g.astype(np.float64)
    x_t = (1 - t.reshape(-1, *[1] * len(shape))) * x + t.reshape(-1, *[1] * len(shape)) * noise
    x_real = _posterior_mean_np(x_t, t, m_real, std)
    x_fake = _posterior_mean_np(x_t, t, m_fake, std)
    eta = np.abs(x - x_real).reshape(batch, -1).mean(axis=1, keepdims=True)
    g = (x_fake - x_real).reshape(batch, -1) / eta
    np.testing.assert_allclose(grad, g / x_g.size, rtol=2e-3, atol=1e-4 * np.abs(g).max() / x_g.size)
    np.testing.assert_allclose(loss, 0.5 * np.mean(g ** 2), rtol=2e-3)
    np.testing.assert_allclose(metrics["dmd_grad_norm"], np.linalg.norm(g, axis=1).mean(), rtol=2e-3)

    # Direction: every sample's gradient is a positive multiple of the analytic reverse-KL gradient.
    kl_grad = ((1 - t)[:, None] * (_score_np(x_t, t, m_fake, std) - _score_np(x_t, t, m_real, std)).reshape(batch, -1))
    direction = (m_fake - m_real).reshape(1, -1)
    cosine = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(cosine(grad, kl_grad), 1.0, atol=1e-5)
    np.testing.assert_allclose(cosine(grad, direction), 1.0, atol=1e-5)
    np.testing.assert_allclose(cosine(grad.mean(0, keepdims=True), direction), 1.0, atol=1e-6)

    # A gradient step on the samples moves the generator's mean toward the data mean.
    stepped = x - 0.1 * x_g.size * grad.reshape(x.shape)
    before = np.linalg.norm(x.mean(0) - m_real)
    after = np.linalg.norm(stepped.mean(0) - m_real)
    assert after < before - 0.02, (before, after)


SIGMA, M_REAL, THETA_0 = 0.5, np.array([1.0, -1.0]), np.array([-2.0, 2.0])


def _generator_samples(theta, key, batch=256):
    """The tiny generator x = theta + sigma * eps."""
    return theta + SIGMA * jax.random.normal(key, (batch, 2))


def _dmd_theta_loss(theta, fake_mean, key):
    k_x, k_dmd = jax.random.split(key)
    x_g = _generator_samples(theta, k_x)
    return dmd_generator_loss(x_g, jnp.zeros((x_g.shape[0],), jnp.int32), k_dmd,
                              real_velocity=gaussian_velocity(M_REAL, SIGMA),
                              fake_velocity=gaussian_velocity(fake_mean, SIGMA), t_min=T_MIN, t_max=T_MAX)[0]


def test_dmd_moves_a_misplaced_generator_onto_the_data_with_exact_scores():
    """SGD (lr 0.5) on theta with the fake score recomputed from the current theta. Per sample, g is a positive
    multiple of theta - m_real, so the fixed point is exactly m_real and the error contracts every step; from
    |theta_0 - m_real| = 4.2 the error measured when this test was written was 0.3-0.5 after 10 steps and 0.0
    (float32-exact) after 30 (seeds 0-2). Tolerance 1e-3 after 100 steps; and the error must shrink early."""

    def run(key):
        def body(theta, i):
            grad = jax.grad(_dmd_theta_loss)(theta, jax.lax.stop_gradient(theta), jax.random.fold_in(key, i))
            theta = theta - 0.5 * grad
            return theta, jnp.linalg.norm(theta - M_REAL)

        return jax.lax.scan(body, jnp.asarray(THETA_0, jnp.float32), jnp.arange(100))

    theta, distance = _quick_compile(run, jax.random.PRNGKey(0))(jax.random.PRNGKey(0))
    distance = np.asarray(distance)
    assert distance[9] < 0.5 * np.linalg.norm(THETA_0 - M_REAL)
    np.testing.assert_allclose(theta, M_REAL, atol=1e-3)


def test_dmd_with_a_trained_fake_score_tracks_the_generator_to_the_data():
    """Two time-scale DMD on the same tiny generator, now with a *learnt* fake score: a Gaussian-family velocity
    model with a trainable mean mu (started at the generator, as the fake score starts as a copy), trained by
    flow matching on the generator's detached samples every step (SGD 0.1), the generator updated every 5th
    step (SGD 0.3), 1000 steps. Measured when written (seeds 0-2): |theta - m_real| 0.02-0.05 after 100 steps,
    at most 0.044 over the last 750, and mu within 0.03 of theta. Asserted: both below 0.15 at the end, and
    below 0.5 of the start after 200 steps."""
    fake_apply = lambda params, z, t, y: gaussian_velocity(params, SIGMA)(z, t, y)
    y = jnp.zeros((256,), jnp.int32)
    critic_optimizer = optax.sgd(0.1)

    def run(key):
        theta = jnp.asarray(THETA_0, jnp.float32)
        mu = theta

        def body(carry, i):
            theta, mu, opt_state = carry
            k_gen, k_critic, k_x = jax.random.split(jax.random.fold_in(key, i), 3)
            grad = jax.grad(_dmd_theta_loss)(theta, mu, k_gen)
            theta = jnp.where(i % 5 == 0, theta - 0.3 * grad, theta)
            x_g = jax.lax.stop_gradient(_generator_samples(theta, k_x))
            critic_grad = jax.grad(lambda m: flow_matching_loss(fake_apply, m, {"x": x_g, "y": y}, k_critic,
                                                                null_label=1, label_dropout=0.0)[0])(mu)
            updates, opt_state = critic_optimizer.update(critic_grad, opt_state, mu)
            return (theta, optax.apply_updates(mu, updates), opt_state), jnp.linalg.norm(theta - M_REAL)

        return jax.lax.scan(body, (theta, mu, critic_optimizer.init(mu)), jnp.arange(1000))

    (theta, mu, _), distance = _quick_compile(run, jax.random.PRNGKey(0))(jax.random.PRNGKey(0))
    start = np.linalg.norm(THETA_0 - M_REAL)
    assert np.asarray(distance)[199] < 0.5 * start
    np.testing.assert_allclose(theta, M_REAL, atol=0.15)
    np.testing.assert_allclose(mu, theta, atol=0.15)


# --- The refine stage on toy2d: hand-off, update isolation, two time-scale schedule, the loop. ---

GENERATOR_EVERY = 3


def _perturbed(params, seed, scale=0.1):
    """Every leaf shifted by N(0, scale^2) noise, so params, EMA params, teacher and sketch all differ (and the
    h-embedding output layer, zero in a fresh model, is not)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(np.asarray(l) + scale * rng.standard_normal(l.shape)).astype(np.float32)
                                        for l in leaves])


def _save_stage(workdir, params, ema_params, optimizer, step=7):
    state = TrainState.create(params, optimizer).replace(ema_params=ema_params, step=jnp.array(step, jnp.int32))
    checkpointer = Checkpointer(str(workdir), keep=1)
    checkpointer.save(step, state, {"step": step})
    checkpointer.close()
    # What hd.main writes beside its checkpoints: hand-offs check a source's stage and that it finished.
    (workdir / "config.json").write_text(json.dumps({"stage": workdir.name, "num_steps": step}))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _same(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def refine(tmp_path_factory):
    """Teacher and sketch checkpoints written by hand (distinct params and EMA params), the refine stage on them
    (toy2d refine_tiny, generator every 3rd step, no warm-up so the first update moves), and 9 steps of its pure
    step run in-process on the loop's batches."""
    root = tmp_path_factory.mktemp("refine")
    base = load_config("toy2d", "tiny")
    model = build_model(base.model, (2,), base.data.num_classes)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), (2,)))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # _perturbed fills every leaf
    optimizer = make_optimizer(base.optimizer)
    trees = {name: _host(_perturbed(fresh, seed)) for seed, name in
             enumerate(["teacher_params", "teacher_ema", "sketch_params", "sketch_ema"])}
    _save_stage(root / "teacher", trees["teacher_params"], trees["teacher_ema"], optimizer)
    _save_stage(root / "sketch", trees["sketch_params"], trees["sketch_ema"], optimizer)

    config = load_config("toy2d", "refine_tiny", {
        "refine.teacher_workdir": str(root / "teacher"), "refine.sketch_workdir": str(root / "sketch"),
        "refine.generator_every": GENERATOR_EVERY, "optimizer.warmup_steps": 0,
        # Pinned so the checks below do not drift with the config file: with guidance the real score differs
        # from the fake score (a copy of the unguided teacher) already at step 0, so the first DMD loss is > 0.
        "refine.real_cfg_scale": 1.5, "refine.gan_head": "awd", "refine.awd_weighting": "attention",
        "num_steps": 6, "log_every": 6, "checkpoint_every": 6})
    validate(config, jax.device_count())
    stage = build_stage(config, (2,))
    data = make_batch_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
    batches = [{k: jnp.asarray(v) for k, v in next(data).items()} for _ in range(9)]
    key = jax.random.PRNGKey(config.seed)  # as the loop starts a fresh run
    states = [_quick_compile(stage.init_state, key)(key)]
    step = _quick_compile(stage.step, states[0], batches[0], stage.frozen)
    frozen_before = _host(stage.frozen)
    metrics = []
    for batch in batches:
        state, m = step(states[-1], batch, stage.frozen)
        states.append(state)
        metrics.append(_host(m))
    return dict(root=root, config=config, model=model, stage=stage, step=step, batches=batches, metrics=metrics,
                states=[_host(s) for s in states], frozen_before=frozen_before, **trees)


def test_refine_generator_starts_from_the_sketch_ema(refine):
    state0, stage = refine["states"][0], refine["stage"]
    assert isinstance(state0, RefineState) and int(state0.step) == 0
    assert _same(state0.params, refine["sketch_ema"]) and _same(state0.ema_params, refine["sketch_ema"])
    assert not _same(state0.params, refine["sketch_params"])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), refine["sketch_ema"])
    stored = read_items(str(refine["root"] / "sketch"), {"ema_params": abstract})[0]["ema_params"]
    assert _same(state0.params, stored)
    # The real score is the teacher's EMA, and the fake score starts as a copy of it.
    assert _same(stage.frozen, refine["teacher_ema"]) and not _same(stage.frozen, refine["teacher_params"])
    assert _same(state0.critic_params["fake_score"], refine["teacher_ema"])
    assert set(state0.critic_params) == {"fake_score", "head"}


def test_refine_generator_from_the_teacher_for_the_no_sketch_baseline(refine):
    config = load_config("toy2d", "refine_tiny", {"refine.teacher_workdir": refine["config"].refine.teacher_workdir,
                                                  "refine.generator_init": "teacher"})
    validate(config, jax.device_count())  # no sketch work directory needed
    key = jax.random.PRNGKey(0)
    state0 = _quick_compile(build_stage(config, (2,)).init_state, key)(key)
    teacher_ema = refine["teacher_ema"]
    assert _same(state0.params, student_from_teacher(teacher_ema))
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(state0.params["h_embedder"]["mlp_2"]))
    for name in state0.params:
        if name != "h_embedder":
            assert _same(state0.params[name], teacher_ema[name]), name
    assert _same(state0.params["h_embedder"]["mlp_0"], teacher_ema["h_embedder"]["mlp_0"])
    assert np.any(teacher_ema["h_embedder"]["mlp_2"]["kernel"])  # student_from_teacher did not zero its input


def test_refine_step_updates_one_tree_at_a_time_on_its_schedule(refine):
    """Over 9 steps: the generator (params, EMA, optimizer state) changes exactly on steps with step % 3 == 0 and
    is bit-identical otherwise; the critic (fake score, head, its optimizer state) changes on every step; the
    teacher passed as the frozen input never changes."""
    states, metrics = refine["states"], refine["metrics"]
    generator_steps, critic_steps = [], []
    for i, (before, after) in enumerate(zip(states[:-1], states[1:])):
        assert int(after.step) == i + 1
        changed = {name: not _same(getattr(before, name), getattr(after, name))
                   for name in ("params", "ema_params", "opt_state")}
        due = i % GENERATOR_EVERY == 0
        assert changed == {"params": due, "ema_params": due, "opt_state": due}, (i, changed)
        if changed["params"]:
            generator_steps.append(i)
        critic_changed = [not _same(before.critic_params["fake_score"], after.critic_params["fake_score"]),
                          not _same(before.critic_params["head"], after.critic_params["head"]),
                          not _same(before.critic_opt_state, after.critic_opt_state)]
        assert all(critic_changed), (i, critic_changed)
        critic_steps.append(i)
        assert metrics[i]["generator_updated"] == float(due)
        assert metrics[i]["skipped"] == 0.0 and int(after.total_skips) == 0
        # Steps without a generator update report zeros for its metrics (the loop masks them out).
        assert (metrics[i]["generator/dmd_loss"] > 0) == due
        assert np.isfinite(metrics[i]["critic/fake_score_loss"]) and np.isfinite(metrics[i]["critic/d_loss"])
    assert generator_steps == [0, 3, 6]
    assert len(critic_steps) / len(generator_steps) == GENERATOR_EVERY
    assert _same(refine["stage"].frozen, refine["frozen_before"])
    assert _same(refine["frozen_before"], refine["teacher_ema"])
    # The fake score has moved away from the teacher it was copied from; the teacher has not followed it.
    assert not _same(states[-1].critic_params["fake_score"], refine["teacher_ema"])


def test_generator_update_leaves_the_critic_alone(refine):
    """A generator step whose critic update is rejected (real images NaN: only the critic's discriminator reads
    them) isolates the generator update: it gives the same generator as the normal step (the generator never
    reads real data and does not depend on the critic's update), the critic trees stay bit-identical, and the
    skip is counted."""
    states, i = refine["states"], 3
    batch = dict(refine["batches"][i], x=jnp.full_like(refine["batches"][i]["x"], jnp.nan))
    after, metrics = refine["step"](jax.tree.map(jnp.asarray, states[i]), batch, refine["stage"].frozen)
    after = _host(after)
    assert _same(after.params, states[i + 1].params) and not _same(after.params, states[i].params)
    assert _same(after.ema_params, states[i + 1].ema_params)
    assert _same(after.opt_state, states[i + 1].opt_state)
    assert _same(after.critic_params, states[i].critic_params)
    assert _same(after.critic_opt_state, states[i].critic_opt_state)
    assert float(metrics["skipped"]) == 1.0 and int(after.total_skips) == 1 and int(after.consecutive_skips) == 1
    assert np.isfinite(float(metrics["generator/loss"]))


def test_refine_through_the_training_loop_matches_the_pure_step(refine, tmp_path):
    """One short train() run (6 steps): the logged generator metrics are averaged over the 2 steps that updated
    the generator only, the critic's over all 6, and the saved state equals 6 in-process steps."""
    from hd.train.loop import train

    last = train(refine["config"], str(tmp_path))
    metrics = refine["metrics"][:6]
    due = [m for i, m in enumerate(metrics) if i % GENERATOR_EVERY == 0]
    np.testing.assert_allclose(last["generator_updated"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(last["generator/dmd_loss"], np.mean([m["generator/dmd_loss"] for m in due]), rtol=1e-4)
    np.testing.assert_allclose(last["critic/fake_score_loss"], np.mean([m["critic/fake_score_loss"] for m in metrics]),
                               rtol=1e-4)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), refine["states"][6])
    saved = read_items(str(tmp_path), {"params": abstract.params, "ema_params": abstract.ema_params,
                                       "critic_params": abstract.critic_params})[0]
    # The replay was compiled without backend optimisations, so the two agree to float rounding (amplified a
    # little by Adam on near-zero gradients), far below what one update changes: measured 0.03-0.04 of it.
    states = refine["states"]
    last_update = {"params": (states[3], states[4]), "ema_params": (states[3], states[4]),
                   "critic_params": (states[5], states[6])}
    for name, (before, after) in last_update.items():
        largest = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        one_update = largest(getattr(after, name), getattr(before, name))
        assert one_update > 0
        assert largest(saved[name], getattr(states[6], name)) < 0.2 * one_update, name


_GOOD = {"refine.teacher_workdir": "/teacher", "refine.sketch_workdir": "/sketch"}


@pytest.mark.parametrize("overrides,message", [
    ({"refine.teacher_workdir": ""}, "refine.teacher_workdir"),
    ({"refine.sketch_workdir": ""}, "refine.sketch_workdir"),
    ({"refine.generator_init": "noise"}, "refine.generator_init"),
    ({"refine.gan_head": "mlp"}, "refine.gan_head"),
    ({"refine.awd_weighting": "max"}, "refine.awd_weighting"),
    ({"refine.feature_net": "clip"}, "refine.feature_net"),
    ({"refine.t_min": 0.5, "refine.t_max": 0.5}, "refine.t_min"),
    ({"refine.generator_every": 0}, "refine.generator_every"),
    ({"refine.critic_lr": 0.0}, "refine.critic_lr"),
    ({"refine.awd_temperature": 0.0}, "refine.awd_temperature"),
    ({"refine.feature_block": 2}, "refine.feature_block"),  # refine_tiny's MLP has 2 blocks
])
def test_refine_config_errors_name_the_key(overrides, message):
    validate(load_config("toy2d", "refine_tiny", _GOOD), 1)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(load_config("toy2d", "refine_tiny", dict(_GOOD, **overrides)), 1)
