"""Training-health measures of a batch of embeddings, computed only when the trainer writes a record.

A method keeps the detached tensors these need in :attr:`clcli.methods.base.StepOutput.health`;
:meth:`clcli.methods.base.Method.health` turns them into numbers at the logging interval, so no
step pays for an SVD or waits for the device.  All functions take and return tensors on the
batch's device (no host synchronisation) and compute in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension standard deviation of the L2-normalised rows of ``z`` [N, D].

    The collapse indicator of SimSiam (Chen & He 2021, arXiv:2011.10566, §4.1): 0 when every
    embedding is the same vector, about 1/sqrt(D) when they spread evenly over the sphere.
    """
    z = F.normalize(z.detach().float().flatten(1), dim=1)
    return z.std(dim=0).mean() if z.shape[0] > 1 else torch.zeros((), device=z.device)


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values of ``z`` [N, D] (1 ≤ value ≤ min(N, D)).

    Roy & Vetterli's effective rank (EUSIPCO 2007), used as RankMe by Garrido et al. 2023
    (arXiv:2210.02885) to tell dimensional collapse: near 1 when the embeddings span one
    direction, near min(N, D) when they fill the space.  The rows are not centred (as in RankMe).
    """
    z = z.detach().float().flatten(1)
    finite = torch.isfinite(z).all()
    s = torch.linalg.svdvals(torch.where(finite, z, torch.zeros_like(z)))  # an SVD of nan fails: nan out instead
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(s[0], float("nan")))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of the distributions ``p`` [..., K] (rows sum to 1)."""
    p = p.detach().float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


def collapse_measures(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``embedding_std`` and ``effective_rank`` of the embeddings ``z`` [N, D]."""
    return {"embedding_std": embedding_std(z), "effective_rank": effective_rank(z)}
