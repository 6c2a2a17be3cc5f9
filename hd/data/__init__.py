"""Datasets (Fashion-MNIST, prepared TFDS datasets, VAE-posterior latents, 2-D toys) and a deterministic
resumable pipeline."""

from hd.data.fashion_mnist import prepare_fashion_mnist
from hd.data.latents import LatentPosteriorSource, open_latent_source
from hd.data.pipeline import BatchIterator, make_batch_iterator
from hd.data.sources import ArraySource, Source, Toy2dSource, TfdsSource, load_source

__all__ = [
    "ArraySource",
    "BatchIterator",
    "LatentPosteriorSource",
    "Source",
    "TfdsSource",
    "Toy2dSource",
    "load_source",
    "make_batch_iterator",
    "open_latent_source",
    "prepare_fashion_mnist",
]
