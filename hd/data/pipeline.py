"""Deterministic, resumable, per-host batch iteration.

Global batch s is a function of (seed, s) alone, so the iterator state is just the next batch
number: resuming (even with a different number of hosts) continues exactly, and every host can
compute its own rows without talking to the others.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from hd.data.sources import Batch, Source, load_source


class BatchIterator:
    """Yields this host's rows of each global batch: {'x': float32 [local_bs, ...], 'y': int32 [local_bs]}.

    Finite sources: batch s covers positions [s*B, (s+1)*B) of the endless stream formed by
    concatenating one permutation per epoch, epoch e shuffled by SeedSequence([seed, e]); a batch
    that crosses an epoch boundary takes its rest from the next epoch. Sources with a `draw` method
    (latents drawn from stored VAE posteriors) also get each row's stream position, which seeds its
    draw. Infinite sources: the global batch is sampled with SeedSequence([seed, s]). Process p
    takes rows [p*b, (p+1)*b), b = B / hosts.
    """

    def __init__(self, source: Source, *, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
        self.source = source
        self.global_batch_size, self.seed = global_batch_size, seed
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.step = 0
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # A batch spans at most a few epochs; keep memory flat.
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._permutations[epoch] = rng.permutation(self.source.num_examples)
        return self._permutations[epoch]

    def _local_rows(self) -> slice:
        start = self.process_index * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        step, self.step = self.step, self.step + 1
        n = self.source.num_examples
        if n is None:
            # Toy sources are cheap, so every host samples the whole global batch and keeps its rows.
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
            batch = self.source.sample(rng, self.global_batch_size)
            return {k: v[self._local_rows()] for k, v in batch.items()}
        first = step * self.global_batch_size
        positions = np.arange(first, first + self.global_batch_size)[self._local_rows()]
        epochs, offsets = np.divmod(positions, n)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch))[offsets[mask]]
        if hasattr(self.source, "draw"):  # random per example (VAE posteriors): seeded by (seed, position)
            return self.source.draw(indices, positions, self.seed)
        return self.source.get(indices)

    def get_state(self) -> dict:
        """JSON-serialisable state; the batch size and seed are kept to catch a mismatched resume."""
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict) -> None:
        for key in ("seed", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator {getattr(self, key)}")
        self.step = int(state["step"])


def make_batch_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> BatchIterator:
    """Loads the source that data_cfg names and iterates over it."""
    return BatchIterator(load_source(data_cfg), global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
