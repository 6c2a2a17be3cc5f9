"""Stage 2, refine: the generator's and the critic's losses (docs/method.md, stage 2).

Two trees, two losses, each differentiated by its own update (hd/train/steps.py:refine_step):

  generator G (x_g = G(eps, y)):   L_G = L_DMD(x_g) + lambda_G * mean softplus(-D(x_g noised to t_d))
  critic (fake score f, head D):   L_C = ||f(x_t, t, y) - (n - sg(x_g))||^2 + lambda_D * L_D(real, sg(x_g))

with L_DMD from hd/objectives/dmd.py and the non-saturating L_D from hd/objectives/adversarial.py. Real and
generated samples are noised to the same level t_d ~ U[t_min, t_max] before the discriminator sees them (a
diffusion GAN). The discriminator D reads the tokens of one block of a feature network (the fake score, or the
frozen teacher) through a head; `discriminator_apply` writes that once for both losses.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import flax.linen as nn
import jax

from hd.flow import interpolate
from hd.models.heads import discriminator_output, weight_entropy
from hd.objectives.adversarial import discriminator_loss, generator_adversarial_loss
from hd.objectives.dmd import VelocityFn, dmd_generator_loss
from hd.objectives.flow_matching import VelocityApply, flow_matching_loss

# (params, noise, y) -> generated sample: the one-step generator
GeneratorApply = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (noise, y) -> generated sample, the generator's parameters already bound (a constant for the critic)
Generator = Callable[[jax.Array, jax.Array], jax.Array]
# (x_t, t, y) -> (D [B], token weights): the critic as it stands, a constant for the generator
Discriminator = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class DiscriminatorApply(Protocol):
    def __call__(self, critic_params: dict, x_t: jax.Array, t: jax.Array, y: jax.Array, *,
                 for_generator: bool) -> tuple[jax.Array, jax.Array]:
        """(critic params {"fake_score", "head"}, x_t, t, y) -> (D [B], token weights [B, N, H])."""


def discriminator_apply(model: nn.Module, head: nn.Module, teacher_params: Any, *, feature_net: str,
                        feature_block: int) -> DiscriminatorApply:
    """D(x_t, t, y) = head(tokens of block `feature_block` of the feature network at (x_t, t, h = 0, y)).
    feature_net="fake_score" reads the critic's own fake score (DMD2: the features train with the head);
    "teacher" reads the frozen teacher (LADD-style), which the critic's gradient then never reaches."""

    def apply(critic_params: dict, x_t: jax.Array, t: jax.Array, y: jax.Array, *,
              for_generator: bool) -> tuple[jax.Array, jax.Array]:
        features = critic_params["fake_score"] if feature_net == "fake_score" else teacher_params
        _, tokens = model.apply({"params": features}, x_t, t, t * 0, y, return_tokens_at=feature_block)
        logits, weights = head.apply({"params": critic_params["head"]}, tokens, for_generator=for_generator)
        return discriminator_output(logits, weights), weights

    return apply


def discriminator_noise_level(key: jax.Array, batch: int, *, t_min: float, t_max: float) -> jax.Array:
    """t_d ~ U[t_min, t_max], one per example (the DMD loss's range). The critic noises real and generated
    samples with the same t_d, so the noise level alone never tells them apart."""
    return jax.random.uniform(key, (batch,), minval=t_min, maxval=t_max)


def refine_generator_loss(generator_apply: GeneratorApply, params: Any, batch: dict[str, jax.Array],
                          key: jax.Array, *, real_velocity: VelocityFn, fake_velocity: VelocityFn,
                          discriminator: Discriminator | None, t_min: float, t_max: float, gan_weight: float
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_DMD + gan_weight * mean softplus(-D(interpolate(x_g, n, t_d))) on fresh samples x_g = G(eps, y).
    The batch gives only the shape and the labels: the generator never reads real data. The scores and the
    discriminator are constants here (closures over the frozen teacher and the critic as it stands);
    `discriminator=None` drops the adversarial term."""
    y = batch["y"]
    k_noise, k_dmd, k_t, k_n = jax.random.split(key, 4)
    x_g = generator_apply(params, jax.random.normal(k_noise, batch["x"].shape), y)
    loss, metrics = dmd_generator_loss(x_g, y, k_dmd, real_velocity=real_velocity, fake_velocity=fake_velocity,
                                       t_min=t_min, t_max=t_max)
    if discriminator is not None:
        t_d = discriminator_noise_level(k_t, y.shape[0], t_min=t_min, t_max=t_max)
        d_generated, weights = discriminator(interpolate(x_g, jax.random.normal(k_n, x_g.shape), t_d), t_d, y)
        adversarial = generator_adversarial_loss(d_generated)
        loss = loss + gan_weight * adversarial
        metrics.update(g_adv_loss=adversarial, token_weight_entropy=weight_entropy(weights))
    # dmd_loss equals 0.5 * mean(g^2): the size of the step, not a fit to the data, so sample quality is read off
    # the evaluator, not this curve. g_adv_loss climbing while the critic's d_acc_* near 1: the discriminator won.
    return loss, dict(metrics, loss=loss)


def refine_critic_loss(velocity_apply: VelocityApply, discriminator: DiscriminatorApply | None,
                       critic_params: dict, batch: dict[str, jax.Array], key: jax.Array, *, generator: Generator,
                       null_label: int, t_min: float, t_max: float, gan_weight: float
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow matching of the fake score on sg(x_g) + gan_weight * L_D(real batch, sg(x_g)), both noised to one
    t_d. The generator is a constant (its parameters bound in `generator`); `discriminator=None` drops L_D
    and the critic is the fake score alone."""
    y = batch["y"]
    k_noise, k_fm, k_t, k_real, k_fake = jax.random.split(key, 5)
    x_g = jax.lax.stop_gradient(generator(jax.random.normal(k_noise, batch["x"].shape), y))
    # No label dropout: the fake score is only ever queried with the generator's own labels (DMD's fake branch).
    loss, fm_metrics = flow_matching_loss(velocity_apply, critic_params["fake_score"], {"x": x_g, "y": y}, k_fm,
                                          null_label=null_label, label_dropout=0.0)
    metrics = {"fake_score_loss": fm_metrics["loss"]}
    if discriminator is not None:
        t_d = discriminator_noise_level(k_t, y.shape[0], t_min=t_min, t_max=t_max)
        d_real, _ = discriminator(critic_params, interpolate(batch["x"], jax.random.normal(k_real, x_g.shape), t_d),
                                  t_d, y, for_generator=False)
        d_fake, weights = discriminator(critic_params, interpolate(x_g, jax.random.normal(k_fake, x_g.shape), t_d),
                                        t_d, y, for_generator=False)
        d_loss, d_metrics = discriminator_loss(d_real, d_fake)
        loss = loss + gan_weight * d_loss
        metrics.update(d_metrics, token_weight_entropy=weight_entropy(weights))
    # fake_score_loss is a flow-matching loss on the generator's distribution (the teacher's loss, on other data):
    # a steady climb means the fake score lags the generator and the DMD direction goes stale. d_acc_real and
    # d_acc_fake both near 1 mean the discriminator has won and the generator's adversarial gradient vanishes.
    return loss, dict(metrics, loss=loss)
