"""Clustering pieces in torch: PCA-whitening, k-means and normalised mutual information.

One shared piece for clustering-based methods, first DeepCluster (Caron et al. 2018,
arXiv:1807.05520): features of the whole training set are reduced by PCA to a few hundred
dimensions, whitened and L2-normalised, then grouped by k-means; the agreement between two
clusterings is measured by their normalised mutual information.  Everything runs in torch on the
device the features live on (so on a GPU when training uses one), and every pass over the points is
cut into chunks of rows, so a data set far larger than one batch fits: the largest temporary is
``chunk_size x k`` distances.  Random choices (initial centroids, re-seeding) come from a
``torch.Generator`` on the CPU, so a clustering is reproducible from its seed (bitwise on one
device; on a GPU, summing the points of a cluster with atomic adds may differ in the last bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "KMeansResult",
    "PCAWhitening",
    "assign_to_centroids",
    "kmeans",
    "kmeans_plus_plus",
    "l2_normalize",
    "normalized_mutual_info",
    "pca_whitening",
]


# --------------------------------------------------------------------------------- PCA-whitening
@dataclass
class PCAWhitening:
    """A fitted PCA-whitening: ``y = (x - mean) @ components / sqrt(eigenvalues + eps)``.

    ``mean``: [D]; ``components``: [D, d], the top-``d`` eigenvectors of the covariance as columns,
    largest eigenvalue first; ``eigenvalues``: [d]; ``eps`` keeps near-zero directions finite.
    """

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    eps: float

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def __call__(self, x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Project and whiten ``x`` [N, D] -> [N, d] (float32, on x's device), chunk by chunk."""
        scale = (self.eigenvalues + self.eps).rsqrt()
        proj = (self.components * scale).to(x.device, torch.float32)
        mean = self.mean.to(x.device, torch.float32)
        out = torch.empty(x.shape[0], proj.shape[1], device=x.device, dtype=torch.float32)
        for s in range(0, x.shape[0], chunk_size):
            out[s : s + chunk_size] = (x[s : s + chunk_size].float() - mean) @ proj
        return out


@torch.no_grad()
def pca_whitening(x: torch.Tensor, dim: int, eps: float = 1e-5, chunk_size: int = 65536) -> PCAWhitening:
    """Fit PCA-whitening to ``x`` [N, D], keeping ``min(dim, D, N - 1)`` directions.

    The mean and covariance are accumulated chunk by chunk in float64 (on x's device) and the
    covariance is diagonalised by ``torch.linalg.eigh``.  Each eigenvector's sign is fixed so that
    its largest-magnitude entry is positive, which makes the result independent of the solver's
    sign convention.  The whitened output has zero mean and (up to ``eps``) identity covariance.
    """
    if x.dim() != 2:
        raise ValueError(f"pca_whitening expects [N, D] features, got shape {tuple(x.shape)}")
    n, d_in = x.shape
    if n < 2:
        raise ValueError(f"pca_whitening needs at least two points, got {n}")
    keep = max(1, min(dim, d_in, n - 1))
    total = torch.zeros(d_in, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk_size):
        total += x[s : s + chunk_size].double().sum(0)
    mean = total / n
    cov = torch.zeros(d_in, d_in, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk_size):
        c = x[s : s + chunk_size].double() - mean
        cov += c.t() @ c
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.flip(0)[:keep].clamp(min=0)
    evecs = evecs.flip(1)[:, :keep]
    pivot = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs[pivot, torch.arange(keep, device=x.device)])
    signs[signs == 0] = 1
    evecs = evecs * signs
    return PCAWhitening(mean, evecs, evals, eps)


def l2_normalize(x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm, in place on a float32 tensor, chunk by chunk."""
    for s in range(0, x.shape[0], chunk_size):
        x[s : s + chunk_size] = F.normalize(x[s : s + chunk_size], dim=1)
    return x


# ----------------------------------------------------------------------------------------- k-means
@dataclass
class KMeansResult:
    """``centroids`` [k, d]; ``assignments`` int64 [N] (index of each point's nearest centroid);
    ``loss``: mean squared distance of the points to their centroids; ``reseeded``: how many
    empty clusters were re-seeded over all iterations; ``empty``: clusters empty at the end."""

    centroids: torch.Tensor
    assignments: torch.Tensor
    loss: float
    reseeded: int
    empty: int


@torch.no_grad()
def assign_to_centroids(
    x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x`` [N, d] and its squared distance, chunk by chunk.

    ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²; only ``chunk_size`` x k distances exist at any time.
    """
    c = centroids.float()
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        xs = x[s : s + chunk_size].float()
        d = (xs * xs).sum(1, keepdim=True) - 2.0 * (xs @ c.t()) + c_sq
        best, idx = d.min(dim=1)
        labels[s : s + chunk_size] = idx
        dists[s : s + chunk_size] = best.clamp(min=0)
    return labels, dists


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances [n, m] between the rows of ``x`` [n, d] and of ``c`` [m, d] (float32, ≥ 0)."""
    x = x.float()
    return ((x * x).sum(1, keepdim=True) - 2.0 * (x @ c.t()) + (c * c).sum(1)).clamp(min=0)


@torch.no_grad()
def kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int = 65536, trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): [k, d] starting centroids drawn from ``x``.

    The first centroid is a uniformly drawn point.  For each next one, ``trials`` candidates
    (default 2 + ⌊ln k⌋, as scikit-learn) are drawn with probability proportional to D(x)², the
    squared distance to the nearest centroid chosen so far, and the candidate that lowers the sum
    of D(x)² most is kept.  Draws are inverse-CDF samples of uniform numbers from ``generator``, so
    the result is the same on any device.
    """
    n = x.shape[0]
    t = trials if trials is not None else 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=torch.float32, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids[0] = x[first].float()
    nearest = torch.empty(n, dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk_size):
        nearest[s : s + chunk_size] = _sq_dist(x[s : s + chunk_size], centroids[:1])[:, 0]
    trial_nearest = torch.empty(n, t, dtype=torch.float32, device=x.device)
    for i in range(1, k):
        cdf = torch.cumsum(nearest.double(), 0)
        total = float(cdf[-1])
        if total <= 0:  # every point coincides with a centroid: uniform draws
            idx = torch.randint(n, (t,), generator=generator).to(x.device)
        else:
            u = torch.rand(t, generator=generator, dtype=torch.float64).to(x.device) * total
            idx = torch.searchsorted(cdf, u).clamp(max=n - 1)
        cand = x[idx].float()
        for s in range(0, n, chunk_size):
            d = _sq_dist(x[s : s + chunk_size], cand)
            trial_nearest[s : s + chunk_size] = torch.minimum(d, nearest[s : s + chunk_size, None])
        best = int(trial_nearest.double().sum(0).argmin())
        centroids[i] = cand[best]
        nearest = trial_nearest[:, best].clone()
    return centroids


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    init: torch.Tensor | str = "kmeans++",
    chunk_size: int = 65536,
    perturbation: float = 1.0 / 1024,
) -> KMeansResult:
    """Lloyd's k-means of ``x`` [N, d] into ``k`` clusters, on x's device.

    Initial centroids: ``"kmeans++"`` (Arthur & Vassilvitskii 2007: each next centroid is a point
    drawn with probability proportional to its squared distance to the nearest centroid so far),
    ``"random"`` (``k`` distinct points drawn uniformly, what faiss, which DeepCluster used, does),
    or a tensor [k, d] of starting centroids.  Each iteration assigns every point to its
    nearest centroid and moves each centroid to the mean of its points.  A cluster left empty is
    re-seeded from a non-empty one: a donor with at least two points is drawn with probability
    proportional to its size minus one and the empty centroid becomes the donor's centroid plus a
    random perturbation of relative size ``perturbation``, so the next assignment splits the
    donor's points between the two.  The returned assignments are those of the final centroids.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects [N, d] points, got shape {tuple(x.shape)}")
    n, d = x.shape
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1 clusters, got {k}")
    if n < k:
        raise ValueError(f"kmeans needs at least as many points as clusters: {n} points for k = {k}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, d):
            raise ValueError(f"kmeans init must have shape {(k, d)}, got {tuple(init.shape)}")
        centroids = init.to(x.device, torch.float32).clone()
    elif init == "random":
        pick = torch.randperm(n, generator=gen)[:k].to(x.device)
        centroids = x[pick].float().clone()
    elif init == "kmeans++":
        centroids = kmeans_plus_plus(x, k, gen, chunk_size)
    else:
        raise ValueError(f"kmeans init must be 'kmeans++', 'random' or a [k, d] tensor, got {init!r}")
    reseeded = 0
    for _ in range(iters):
        labels, _ = assign_to_centroids(x, centroids, chunk_size)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float32, device=x.device)
        for s in range(0, n, chunk_size):
            sums.index_add_(0, labels[s : s + chunk_size], x[s : s + chunk_size].float())
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).float()
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            weights = (counts - 1).clamp(min=0).double().cpu()
            if float(weights.sum()) == 0.0:
                break  # every point is alone in its cluster: nothing can be split
            donors = torch.multinomial(weights, empty.numel(), replacement=True, generator=gen).to(x.device)
            noise = torch.randn(empty.numel(), d, generator=gen).to(x.device)
            base = centroids[donors]
            size = base.norm(dim=1, keepdim=True).clamp(min=1e-12) * perturbation
            centroids[empty] = base + size * F.normalize(noise, dim=1)
            reseeded += int(empty.numel())
    labels, dists = assign_to_centroids(x, centroids, chunk_size)
    empty_end = int((torch.bincount(labels, minlength=k) == 0).sum())
    return KMeansResult(centroids, labels, float(dists.double().mean()), reseeded, empty_end)


# ------------------------------------------------------------------------------------------- NMI
def _entropy(counts: torch.Tensor, n: int) -> torch.Tensor:
    p = counts.double() / n
    p = p[p > 0]
    return -(p * p.log()).sum()


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor, average: str = "geometric") -> float:
    """Normalised mutual information of two labelings ``a`` and ``b`` (int [N]).

    NMI(A; B) = I(A; B) / avg(H(A), H(B)), with I(A; B) = Σ_ij (n_ij/N) log(N n_ij / (a_i b_j)) over
    the contingency counts n_ij and the marginals a_i, b_j.  DeepCluster (arXiv:1807.05520, eq. 3)
    normalises by the geometric mean sqrt(H(A) H(B)) (``average="geometric"``); scikit-learn's
    default is the arithmetic mean (``"arithmetic"``).  Label values need not be contiguous; the
    contingency table is built sparsely, so 10,000 x 10,000 clusterings cost only N.  Two
    labelings that are each a single cluster agree perfectly (1.0).
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"normalized_mutual_info needs two label vectors of one length, got {a.shape} and {b.shape}")
    if average not in ("geometric", "arithmetic", "max", "min"):
        raise ValueError(f"average must be geometric, arithmetic, max or min, got {average!r}")
    n = int(a.shape[0])
    if n == 0:
        return 1.0
    a = a.detach().to("cpu", torch.long)
    b = b.detach().to("cpu", torch.long)
    ua, ia = torch.unique(a, return_inverse=True)
    ub, ib = torch.unique(b, return_inverse=True)
    if len(ua) == len(ub) == 1:
        return 1.0
    ca = torch.bincount(ia, minlength=len(ua)).double()
    cb = torch.bincount(ib, minlength=len(ub)).double()
    pairs, nij = torch.unique(ia * len(ub) + ib, return_counts=True)
    nij = nij.double()
    ai = ca[pairs // len(ub)]
    bj = cb[pairs % len(ub)]
    mi = float((nij / n * (math.log(n) + nij.log() - ai.log() - bj.log())).sum())
    ha, hb = float(_entropy(ca, n)), float(_entropy(cb, n))
    if average == "geometric":
        norm = math.sqrt(ha * hb)
    elif average == "arithmetic":
        norm = (ha + hb) / 2
    elif average == "max":
        norm = max(ha, hb)
    else:
        norm = min(ha, hb)
    mi = max(mi, 0.0)
    return mi / max(norm, 1e-300) if norm > 0 else 0.0
