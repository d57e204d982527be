"""Running summaries of posterior predictive draws, updated block by block so no draw is kept: mean and variance
(Welford/Chan) and the sample CRPS against observed values. The streamed predictive (``predictive.py``) feeds them.
"""
from __future__ import annotations


import numpy as np
import torch

# SSIM window: 7 voxels with a Gaussian sigma of 1.5. The usual 11-voxel window would leave
# only 22x22 valid positions on a 32x32 slice and blurs small structures in ~40^3


def _as_tensor(x, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device=device, dtype=torch.float64)


class StreamingCRPS:
    """Sample-based CRPS for a fixed block of subjects, fed with chunks of predictive samples.

    For a predictive X with samples X_1, X_2, ... the CRPS at y is E|X - y| - E|X - X'|/2.
    This accumulates

        A = mean_s |X_s - y|                        (all samples)
        B = mean_p |X_{2p-1} - X_{2p}|              (disjoint consecutive pairs)

    and estimates CRPS = A - B/2. Both means are unbiased (pairs of independent draws are
    independent copies of X, X'), so the estimate is unbiased, and memory stays O(n V)
    instead of the O(S^2) of the all-pairs form. A chunk with an odd number of samples
    keeps its last sample to pair with the first one of the next chunk.

    Accumulation is float64 on the device of the first chunk (GPU samples stay on the GPU).
    """

    def __init__(self, y):
        self._y = y
        self._abs_dev = None  # running sum of |X_s - y|
        self._pair_dev = None  # running sum of |X - X'| over completed pairs
        self._n_samples = 0
        self._n_pairs = 0
        self._unpaired = None  # last sample of a chunk still waiting for its partner

    def update(self, samples) -> None:
        """Add samples of shape (s, n, V) (or (s, *y.shape)); torch or numpy."""
        device = samples.device if isinstance(samples, torch.Tensor) else None
        x = _as_tensor(samples, device)
        if not isinstance(self._y, torch.Tensor) or self._y.device != x.device:
            self._y = _as_tensor(self._y, x.device)
        if x.shape[1:] != self._y.shape:
            raise ValueError(f"samples of shape {tuple(x.shape)} do not match y of shape {tuple(self._y.shape)}")
        if x.shape[0] == 0:
            return
        if self._abs_dev is None:
            self._abs_dev = torch.zeros_like(self._y)
            self._pair_dev = torch.zeros_like(self._y)

        self._abs_dev += (x - self._y).abs().sum(0)
        self._n_samples += x.shape[0]

        if self._unpaired is not None:  # complete the pair left open by the previous chunk
            self._pair_dev += (self._unpaired - x[0]).abs()
            self._n_pairs += 1
            self._unpaired, x = None, x[1:]
        n_pairs = x.shape[0] // 2
        pairs = x[: 2 * n_pairs].reshape(n_pairs, 2, *x.shape[1:])
        self._pair_dev += (pairs[:, 0] - pairs[:, 1]).abs().sum(0)
        self._n_pairs += n_pairs
        if x.shape[0] % 2:
            self._unpaired = x[-1].clone()

    def value(self, average: bool = True):
        """The mean CRPS (float) or, with average=False, the entry-wise CRPS map as numpy."""
        if self._n_pairs == 0:
            raise ValueError("StreamingCRPS needs at least two samples")
        crps_map = self._abs_dev / self._n_samples - 0.5 * self._pair_dev / self._n_pairs
        return float(crps_map.mean()) if average else crps_map.cpu().numpy()


class StreamingMoments:
    """Running mean and variance along axis 0 of chunks, merged with Chan et al.'s update.

    Merging a chunk (count n_b, mean m_b, sum of squared deviations M2_b) into the running
    state (n_a, m_a, M2_a):

        n = n_a + n_b,  d = m_b - m_a,  m = m_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n.

    This is Welford's algorithm generalised to chunks; unlike sum / sum-of-squares it does
    not lose precision when the mean is large relative to the spread. Float64 throughout,
    on the device of the first chunk.
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._m2 = None

    def update(self, x) -> None:
        """Add a chunk of shape (s, ...) (torch or numpy)."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        n_b = x.shape[0]
        if n_b == 0:
            return
        # Chunk statistics in the chunk's own precision (centred, so float32 loses nothing that
        # matters); only the merge below, where rounding would accumulate, is float64.
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        target = self._mean.device if self._mean is not None else x.device
        mean_b, m2_b = mean_b.to(target, torch.float64), m2_b.to(target, torch.float64)
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            raise ValueError("StreamingMoments has seen no data")
        return self._mean

    def variance(self, ddof: int = 1) -> torch.Tensor:
        """Variance with divisor count - ddof (ddof=1: the unbiased sample variance)."""
        if self.count - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} samples, have {self.count}")
        return self._m2 / (self.count - ddof)

    def sd(self, ddof: int = 1) -> torch.Tensor:
        return self.variance(ddof).sqrt()


# --------------------------------------------------------------------------- metrics.json
