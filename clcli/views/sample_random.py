"""Counter-based random numbers for augmentation made in batches.

Each sample of a batch draws its augmentation parameters from its own stream, keyed by the sample's
seed (``clcli.engine.loader.sample_seed(seed, epoch, index)``) and by a stream number (one per view),
so a sample's parameters depend on nothing else: not on the batch it lands in, the number of
processes or DataLoader workers, nor the device. The draws are the splitmix64 finaliser of
(seed, stream, counter), computed on uint64 arrays whose arithmetic wraps modulo 2**64, then mapped to
doubles in [0, 1) from their top 53 bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0xD1B54A32D192ED03)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SampleRandom:
    """Uniform draws per sample: row ``i`` of every draw depends only on ``seeds[i]``, the stream and
    how many numbers this object has drawn before.

    ``uniform(n)`` returns a float64 tensor of shape ``[B, n]`` on the CPU (move it to the device with
    the images); ``fork(stream)`` gives an independent object for another view of the same samples.
    """

    def __init__(self, seeds: Sequence[int] | np.ndarray | torch.Tensor, stream: int = 0) -> None:
        if isinstance(seeds, torch.Tensor):
            seeds = seeds.cpu().numpy()
        self.seeds = np.asarray(seeds).astype(np.uint64).reshape(-1)
        self.stream = int(stream)
        self._key = _mix(self.seeds ^ _mix(np.full_like(self.seeds, np.uint64(self.stream + 1)) * _STREAM))
        self.counter = 0

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def fork(self, stream: int) -> SampleRandom:
        return SampleRandom(self.seeds, stream)

    def uniform(self, n: int = 1, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        k = np.arange(self.counter + 1, self.counter + n + 1, dtype=np.uint64)
        self.counter += n
        with np.errstate(over="ignore"):
            z = _mix(self._key[:, None] + k[None, :] * _GOLDEN)
        u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return torch.from_numpy(low + (high - low) * u)

    def bernoulli(self, p: float, n: int = 1) -> torch.Tensor:
        """Boolean ``[B, n]``: True with probability ``p``."""
        return self.uniform(n) < p

    def permutations(self, k: int) -> torch.Tensor:
        """A uniformly random permutation of ``range(k)`` per sample, shape ``[B, k]`` (argsort of uniforms)."""
        return torch.argsort(self.uniform(k), dim=1)
