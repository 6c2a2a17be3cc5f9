"""Diffusion-GAN losses (DMD2-style): real images and generated ones are noised to the same random t_d,
passed through a feature network, and scored by a discriminator head (docs/method.md, stage 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def discriminator_loss(d_real: jax.Array, d_fake: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Non-saturating: softplus(D(fake)) + softplus(-D(real)), averaged; accuracy = share on the right side."""
    loss = jnp.mean(jax.nn.softplus(d_fake)) + jnp.mean(jax.nn.softplus(-d_real))
    return loss, {"d_loss": loss, "d_acc_real": jnp.mean(d_real > 0), "d_acc_fake": jnp.mean(d_fake < 0)}


def generator_adversarial_loss(d_generated: jax.Array) -> jax.Array:
    """softplus(-D(G)), averaged."""
    return jnp.mean(jax.nn.softplus(-d_generated))
