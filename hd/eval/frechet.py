"""Fréchet distance between Gaussians fitted to feature sets (FID when the features are Inception pool_3).

FD = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

Numerics (all float64):
- (S1 S2)^{1/2} comes from `scipy.linalg.sqrtm` (Schur method). S1 S2 is similar to the PSD matrix
  S1^{1/2} S2 S1^{1/2}, so its square root exists, but with fewer samples than feature dimensions the
  covariances are singular and sqrtm can return non-finite or inaccurate results. We check the residual
  ||X X - S1 S2||_F / ||S1 S2||_F; if it is not finite or above `_SQRTM_RTOL`, we retry once with both
  covariances offset by eps·I (the standard fix used by the TF and pytorch-fid evaluators). Unlike those, the
  offset is then also used in the trace terms, so the result is the exact FD of two valid (regularised)
  Gaussians; this keeps FD(x, x) = 0 and differs from the unregularised value by O(eps · dim).
- Rounding can leave a tiny imaginary part in the square root. It is dropped only if every diagonal
  imaginary part (the trace is all we use) is at most `_IMAG_RTOL` times max(1, largest |real diagonal|);
  otherwise something is wrong with the statistics and we raise ValueError instead of reporting a number.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

_SQRTM_RTOL = 1e-5
_IMAG_RTOL = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_is_accurate(root: np.ndarray, target: np.ndarray) -> bool:
    if not np.all(np.isfinite(root)):
        return False
    scale = max(np.linalg.norm(target), np.finfo(np.float64).tiny)
    return np.linalg.norm(root @ root - target) <= _SQRTM_RTOL * scale


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); see the module docstring for the numerics."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")

    root = scipy.linalg.sqrtm(s1 @ s2)
    if not _sqrtm_is_accurate(root, s1 @ s2):
        s1, s2 = s1 + eps * np.eye(d), s2 + eps * np.eye(d)
        root = scipy.linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(root)):
            raise ValueError("matrix square root of sigma1 @ sigma2 is not finite even with the eps offset")

    if np.iscomplexobj(root):
        diag = np.diagonal(root)
        max_imag = np.max(np.abs(diag.imag))
        if max_imag > _IMAG_RTOL * max(1.0, np.max(np.abs(diag.real))):
            raise ValueError(
                f"matrix square root has a large imaginary component ({max_imag:.3g}); "
                "the covariances are probably not valid (non-PSD, NaNs, or mismatched features)"
            )
        root = root.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))


def frechet_distance_to_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FD between the Gaussian fitted to `features` [N, D] (mean, unbiased covariance) and N(mu_ref, sigma_ref).

    With N > D this is `frechet_distance(*feature_statistics(features), mu_ref, sigma_ref)`. With N <= D (fewer
    samples than Inception's 2048 features: small evaluations, CI) the covariance S = Xᵀ X / (N − 1) of the
    centred features X has rank < N, and the trace term is computed exactly in N dimensions: the non-zero
    eigenvalues of sigma_ref · S are those of the symmetric N × N matrix X sigma_ref Xᵀ / (N − 1), so
    Tr (sigma_ref S)^{1/2} is the sum of their square roots. No eps offset is needed, and it costs O(N D²)
    instead of a D × D matrix square root (minutes for D = 2048 on a small CPU).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D], got {f.shape}")
    n, d = f.shape
    if n > d:
        return frechet_distance(*feature_statistics(f), mu_ref, sigma_ref)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if mu_ref.shape != (d,) or sigma_ref.shape != (d, d):
        raise ValueError(f"shape mismatch: features {f.shape}, mu_ref {mu_ref.shape}, sigma_ref {sigma_ref.shape}")
    mu = f.mean(axis=0)
    x = f - mu
    gram = x @ sigma_ref @ x.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2)
    scale = max(float(np.max(np.abs(eigenvalues))), np.finfo(np.float64).tiny)
    if eigenvalues.min() < -_IMAG_RTOL * scale:
        raise ValueError(f"sigma_ref is not positive semi-definite (eigenvalue {eigenvalues.min():.3g} of "
                         "X sigma_ref Xᵀ): the square root would be imaginary; check the reference statistics")
    diff = mu - mu_ref
    trace_fake = float(np.sum(x * x)) / (n - 1)
    return float(diff @ diff + trace_fake + np.trace(sigma_ref) - 2.0 * np.sum(np.sqrt(np.clip(eigenvalues, 0, None))))
