"""The flow-matching path, conversions, classifier-free guidance and the samplers, against closed forms.

Data x ~ N(m, s^2) per coordinate and z_t = (1 - t) x + t eps. Then z_t ~ N((1 - t) m, sig_t^2) with
sig_t^2 = (1 - t)^2 s^2 + t^2, and the marginal velocity E[eps - x | z_t = z] is exactly
    v(z, t) = (t - (1 - t) s^2) / sig_t^2 * (z - (1 - t) m) - m.
Its probability-flow ODE maps noise eps at t = 1 to x = m + s * eps at t = 0 (the trajectory is
z_t = (1 - t) m + sig_t eps), so each sample has a known exact endpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hd import flow

M, S = 1.5, 0.5


def gaussian_velocity(z, t, y):
    del y
    t = t[:, None]
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    return (t - (1 - t) * S ** 2) / var * (z - (1 - t) * M) - M


def exact_flow(eps, t):
    """z_t on the trajectory that starts at eps (t = 1)."""
    return (1 - t) * M + np.sqrt((1 - t) ** 2 * S ** 2 + t ** 2) * eps


@pytest.fixture(scope="module")
def noise():
    return jax.random.normal(jax.random.PRNGKey(0), (512, 3))


def _error(method, num_steps, noise):
    labels = jnp.zeros(noise.shape[0], jnp.int32)
    x = jax.jit(lambda n: flow.sample_ode(gaussian_velocity, n, labels, num_steps=num_steps, method=method))(noise)
    return float(jnp.max(jnp.abs(x - (M + S * noise))))


def test_velocity_closed_form_matches_trajectory(noise):
    """Sanity of the reference itself: d/dt of the exact trajectory equals the closed-form velocity."""
    t, dt = 0.37, 1e-3
    eps = np.asarray(noise, np.float64)
    derivative = (exact_flow(eps, t + dt) - exact_flow(eps, t - dt)) / (2 * dt)
    v = gaussian_velocity(exact_flow(eps, t), np.full(eps.shape[0], t), None)
    np.testing.assert_allclose(derivative, v, atol=1e-5)


def test_euler_and_heun_converge_at_their_orders(noise):
    steps = (4, 8, 16)
    euler = [_error("euler", n, noise) for n in steps]
    heun = [_error("heun", n, noise) for n in steps]
    # Both converge as the step count grows.
    assert euler[0] > euler[1] > euler[2] and heun[0] > heun[1] > heun[2]
    # Euler is first order: halving the step roughly halves the error (ratio ~2).
    for a, b in zip(euler, euler[1:]):
        assert 1.6 < a / b < 2.6, euler
    # Heun is second order (its final step is Euler, which adds only O(h^2)): ratio ~4.
    for a, b in zip(heun, heun[1:]):
        assert 3.0 < a / b < 5.5, heun
    # At the same step count Heun is much more accurate than Euler, and the gap widens with the step count
    # (measured: 2.4x at 4 steps, 13x at 16).
    for e, h in zip(euler, heun):
        assert h < e / 2, (euler, heun)
    assert heun[-1] < euler[-1] / 8 and heun[-1] < 0.03, (euler, heun)


def test_heun_nfe_and_single_step():
    assert flow.ode_nfe(10, "euler") == 10 and flow.ode_nfe(10, "heun") == 19
    calls = []

    def counting(z, t, y):
        calls.append(t)
        return jnp.ones_like(z)

    z = jnp.zeros((2, 2))
    out = flow.sample_ode(counting, z, jnp.zeros(2, jnp.int32), num_steps=1, method="heun")
    np.testing.assert_allclose(out, -1.0)  # dz/dt = 1 integrated from t = 1 down to 0
    with pytest.raises(ValueError, match="rk4"):
        flow.sample_ode(counting, z, jnp.zeros(2, jnp.int32), num_steps=2, method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample_ode(counting, z, jnp.zeros(2, jnp.int32), num_steps=0)


def test_point_mass_is_exact_with_one_euler_step():
    """Data = a point mass at m: paths are straight, v = (z - m) / t, so one Euler step lands on m."""
    m = jnp.array([0.3, -2.0])
    velocity = lambda z, t, y: (z - m) / t[:, None]
    eps = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    x = flow.sample_ode(velocity, eps, jnp.zeros(8, jnp.int32), num_steps=1)
    np.testing.assert_allclose(x, jnp.broadcast_to(m, x.shape), atol=1e-6)


def test_mean_flow_sampler_with_exact_average_velocity(noise):
    """The exact average velocity over [r, t] is (z_t - z_r) / (t - r) along the trajectory; one jump from
    t = 1 lands on the exact sample, and k jumps visit the trajectory."""
    eps = np.asarray(noise, np.float64)

    def average_velocity(z, r, t, y):
        # Invert the trajectory to recover eps from z at time t, then difference the exact flow.
        t_, r_ = t[:, None], r[:, None]
        e = (z - (1 - t_) * M) / jnp.sqrt((1 - t_) ** 2 * S ** 2 + t_ ** 2)
        z_r = (1 - r_) * M + jnp.sqrt((1 - r_) ** 2 * S ** 2 + r_ ** 2) * e
        return (z - z_r) / (t_ - r_)

    labels = jnp.zeros(eps.shape[0], jnp.int32)
    for k in (1, 3):
        x = flow.sample_mean_flow(average_velocity, noise, labels, num_steps=k)
        np.testing.assert_allclose(x, M + S * eps, atol=1e-5)


def _labelled_velocity(z, t, y):
    """A velocity that depends on the label, including the null label 5."""
    return z * (y[:, None] + 1.0) + t[:, None] - 0.5 * (y[:, None] == 5)


def test_guided_velocity_scales():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.linspace(0.05, 0.95, 6).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 0])

    @jax.jit
    def all_scales(z, t, y, traced_one):
        cond = _labelled_velocity(z, t, y)
        uncond = _labelled_velocity(z, t, jnp.full_like(y, 5))
        guided = {w: flow.guided_velocity(_labelled_velocity, 5, w)(z, t, y) for w in (1.0, 0.0, 2.5)}
        return cond, uncond, guided, flow.guided_velocity(_labelled_velocity, 5, traced_one)(z, t, y)

    cond, uncond, guided, guided_traced_one = all_scales(z, t, y, jnp.float32(1.0))
    assert float(jnp.max(jnp.abs(cond - uncond))) > 0.1
    # Scale 1 is the conditional velocity (both the shortcut for a Python 1.0 and the traced path).
    np.testing.assert_allclose(guided[1.0], cond, rtol=1e-6)
    np.testing.assert_allclose(guided_traced_one, cond, rtol=1e-5, atol=1e-6)
    # Scale 0 is the unconditional velocity (the null label).
    np.testing.assert_allclose(guided[0.0], uncond, rtol=1e-5, atol=1e-6)
    # Scale w extrapolates: uncond + w (cond - uncond).
    np.testing.assert_allclose(guided[2.5], uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_interval():
    """Outside the interval the scale is 1 (plain conditional velocity)."""
    z = np.random.default_rng(3).standard_normal((4, 2)).astype(np.float32)
    t = np.array([0.1, 0.3, 0.6, 0.9], np.float32)
    y = np.array([1, 2, 3, 4])
    cond = _labelled_velocity(z, t, y)
    uncond = _labelled_velocity(z, t, np.full_like(y, 5))
    got = jax.jit(flow.guided_velocity(_labelled_velocity, 5, 3.0, interval=(0.2, 0.7)))(z, t, y)
    inside = np.array([False, True, True, False])
    expected = np.where(inside[:, None], uncond + 3.0 * (cond - uncond), cond)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 2), (3, 4, 4, 1)])
def test_conversions_invert_interpolate(shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    t = rng.uniform(0.01, 0.99, shape[0]).astype(np.float32)

    @jax.jit
    def roundtrip(x, eps, t):
        z = flow.interpolate(x, eps, t)
        v = eps - x  # the conditional velocity
        ends = (flow.interpolate(x, eps, jnp.zeros_like(t)), flow.interpolate(x, eps, jnp.ones_like(t)))
        return z, flow.data_from_velocity(z, t, v), flow.noise_from_velocity(z, t, v), ends

    z, x_hat, eps_hat, (at_0, at_1) = roundtrip(x, eps, t)
    tb = t.reshape((-1,) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(z, (1 - tb) * x + tb * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_hat, x, atol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
    # Endpoints of the path: t = 0 is data, t = 1 is noise.
    np.testing.assert_allclose(at_0, x)
    np.testing.assert_allclose(at_1, eps)
