"""Evaluation metrics: Fréchet distance, k-NN precision/recall, Inception Score, and the FID InceptionV3."""

from hd.eval.frechet import feature_statistics, frechet_distance, frechet_distance_to_features
from hd.eval.inception import (
    InceptionV3,
    file_sha256,
    inception_features,
    init_inception_params,
    load_inception_params,
    preprocess_for_inception,
    quantize_to_uint8,
    save_inception_params,
    torch_state_dict_to_variables,
)
from hd.eval.inception_score import inception_score
from hd.eval.precision_recall import precision_recall

__all__ = [
    "InceptionV3",
    "feature_statistics",
    "file_sha256",
    "frechet_distance",
    "frechet_distance_to_features",
    "inception_features",
    "inception_score",
    "init_inception_params",
    "load_inception_params",
    "precision_recall",
    "preprocess_for_inception",
    "quantize_to_uint8",
    "save_inception_params",
    "torch_state_dict_to_variables",
]
