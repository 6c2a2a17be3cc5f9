"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs") from the FID InceptionV3's
1008-way logits.

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = mean of p(y|x) over the split,

computed on `num_splits` equal contiguous splits of the samples and reported as the mean (and standard
deviation) over splits. With 50,000 samples and 10 splits (5,000 per split) this is the ADM / guided-diffusion
evaluator's number (it splits in blocks of 5,000 and reports the mean) and improved-GAN's original protocol. The
softmax runs over all 1008 logits of the 2015-12-05 graph, as in those evaluators (8 of the outputs are unused
classes). Computed in float64 from the logits with log-softmax, so p·log p is exact at p → 0 (no epsilon).
"""

from __future__ import annotations

import numpy as np
import scipy.special


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `num_splits` equal contiguous splits of the Inception Score of logits [N, K]."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must have shape [N, K], got {logits.shape}")
    n = logits.shape[0]
    if not 1 <= num_splits <= n or n % num_splits:
        raise ValueError(f"{n} samples do not split into {num_splits} equal parts: use a number of samples that is "
                         "a multiple of config.eval.inception_splits (50,000 and 10 in the standard protocol)")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or inf: the samples or the Inception weights are broken")
    log_p = scipy.special.log_softmax(logits, axis=1)
    scores = []
    for part in np.split(log_p, num_splits):
        # log p(y) of the split: log of the mean of p(y|x), computed stably.
        log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(part) * (part - log_marginal[None, :]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))
