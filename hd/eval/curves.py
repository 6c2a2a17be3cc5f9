"""Scores written during training (config.eval_every: TensorBoard scalars eval/fd, eval/recall, ...) read back
from a run's event files, so a comparison of runs can put their curves side by side."""

from __future__ import annotations

import glob
import os

import numpy as np


def read_scalar_curves(workdir: str, prefix: str = "eval/") -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] in step order} for every scalar tag of `workdir`'s event files that starts with
    `prefix` ({} when the run wrote none). A step logged twice (a resumed run) keeps its last value."""
    # Imported here: the event reader pulls in TensorFlow's protos, seconds that other callers do not need.
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    curves: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        events = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.TENSORS: 0,
                                                                         event_accumulator.SCALARS: 0})
        events.Reload()
        tags = events.Tags()
        for tag in tags.get("tensors", []):
            if tag.startswith(prefix):
                for e in events.Tensors(tag):
                    curves.setdefault(tag, {})[int(e.step)] = float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)))
        for tag in tags.get("scalars", []):
            if tag.startswith(prefix):
                for e in events.Scalars(tag):
                    curves.setdefault(tag, {})[int(e.step)] = float(e.value)
    return {tag: sorted(points.items()) for tag, points in sorted(curves.items())}
