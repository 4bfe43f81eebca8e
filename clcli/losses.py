"""Loss functions: pure, tensors in, scalar out, computed in fp32.

Every function casts its inputs to float32 and disables autocast inside, because temperatures as
low as 0.04 amplify bf16 rounding.  Shapes are documented per function; each docstring gives the
paper's equation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T", bound=Callable[..., torch.Tensor])


def fp32(fn: T) -> T:
    """Run ``fn`` with autocast off and every floating tensor argument cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        def cast(x):  # type: ignore[no-untyped-def]
            return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (arXiv:2002.05709, eq. 1).

    ``z1`` and ``z2``: [N, D] projections of two views of the same N images (row i of each is a
    positive pair).  With sim(u, v) = uᵀv / (‖u‖‖v‖) over the 2N views,

        ℓ(i, j) = −log  exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)

    and the loss is the mean of ℓ over all 2N ordered positive pairs (each view is an anchor once;
    its 2N − 2 negatives are every other view but itself and its partner).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"nt_xent expects two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


# ------------------------------------------------------------------------------ SwAV (sinkhorn)
@fp32
@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp codes of SwAV (arXiv:2006.09882, §3.1 eq. 3 and appendix A.1); no gradient.

    ``scores``: [B, K] prototype scores zᵀc_k of B samples (cosine similarities: normalised
    embeddings and prototypes).  The codes solve the entropy-regularised transport problem

        max_{Q ∈ 𝒬}  Tr(Qᵀ Cᵀ Z) + ε H(Q),   𝒬 = {Q ∈ ℝ₊^{K×B} : Q 1_B = 1_K / K,  Qᵀ 1_K = 1_B / B}

    whose solution is Q* = Diag(u) exp(CᵀZ / ε) Diag(v): starting from exp(CᵀZ / ε) scaled to sum
    to one, each iteration rescales the rows (prototypes) to sum to 1/K, then the columns (samples)
    to 1/B.  The result is returned as [B, K] and multiplied by B, so that every sample's code sums
    to exactly one (the column step is last) and each prototype receives about B/K samples (the
    equipartition, exact as ``iterations`` grows).  ``all_reduce``: an in-place sum over processes
    (:func:`clcli.dist.all_reduce_sum`) so that the equipartition is over the global batch; None in
    one process.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape [B, K], got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and at least one iteration, got {epsilon}, {iterations}")
    reduce = all_reduce if all_reduce is not None else (lambda t: t)
    q = torch.exp(scores / epsilon).t()  # [K, B]
    k = q.shape[0]
    b = float(reduce(torch.tensor(float(q.shape[1]), device=q.device)))
    total = reduce(q.sum())
    q = q / total
    for _ in range(iterations):
        q = q / reduce(q.sum(dim=1, keepdim=True)) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


@fp32
def swav_loss(
    scores: torch.Tensor, codes: torch.Tensor, code_views: list[int] | tuple[int, ...], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's swapped prediction over multi-crop views (arXiv:2006.09882, eqs. 1-2 and §3.2).

    ``scores``: [V, B, K] scores z_tᵀc_k of every view t (normalised embeddings and prototypes);
    ``codes``: [C, B, K] codes q_s (from :func:`sinkhorn`, treated as constants) of the C views
    whose positions among the V are ``code_views``.  With p_t = softmax(z_tᵀC / τ),

        ℓ(z_t, q_s) = − Σ_k q_s^(k) log p_t^(k)

    and the loss is (1/C) Σ_s (1/(V − 1)) Σ_{t ≠ s} mean over the batch of ℓ(z_t, q_s): every
    other crop predicts the code of each code view.
    """
    if scores.dim() != 3 or codes.dim() != 3 or codes.shape[1:] != scores.shape[1:]:
        raise ValueError(
            f"swav_loss expects scores [V, B, K] and codes [C, B, K], "
            f"got {tuple(scores.shape)} and {tuple(codes.shape)}"
        )
    if len(code_views) != codes.shape[0] or any(not 0 <= s < scores.shape[0] for s in code_views):
        raise ValueError(f"code_views {list(code_views)} must give one position among {scores.shape[0]} views per code")
    if scores.shape[0] < 2:
        raise ValueError("swav_loss needs at least two views")
    log_p = F.log_softmax(scores / temperature, dim=-1)  # [V, B, K]
    codes = codes.detach()
    total = scores.new_zeros(())
    for c, s in enumerate(code_views):
        others = [t for t in range(scores.shape[0]) if t != s]
        cross = -(codes[c].unsqueeze(0) * log_p[others]).sum(dim=-1)  # [V-1, B]
        total = total + cross.mean()
    return total / len(code_views)


# ----------------------------------------------------------------------------------------- DINO
@fp32
def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    teacher_views: list[int] | tuple[int, ...],
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """DINO's self-distillation cross-entropy with centring and sharpening (arXiv:2104.14294, eqs. 1-3).

    ``student``: [V, B, K] student head outputs g_s of every view; ``teacher``: [T, B, K] teacher
    outputs g_t of the T global views, which are the student's views ``teacher_views``; ``center``:
    [K] (or [1, K]) the running centre c.  With

        P_t = softmax((g_t − c) / τ_t)   (centred, sharpened; no gradient)
        P_s = softmax(g_s / τ_s)

    the loss is the mean over the pairs (t, s) with s ≠ teacher_views[t] of the batch mean of
    H(P_t, P_s) = − Σ_k P_t^(k) log P_s^(k).
    """
    if student.dim() != 3 or teacher.dim() != 3 or teacher.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"dino_loss expects student [V, B, K] and teacher [T, B, K], got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if len(teacher_views) != teacher.shape[0] or any(not 0 <= s < student.shape[0] for s in teacher_views):
        raise ValueError(
            f"teacher_views {list(teacher_views)} must give one position among {student.shape[0]} views "
            "per teacher output"
        )
    p_t = F.softmax((teacher.detach() - center.detach().reshape(1, 1, -1)) / teacher_temperature, dim=-1)
    log_p_s = F.log_softmax(student / student_temperature, dim=-1)
    total = student.new_zeros(())
    pairs = 0
    for t, own in enumerate(teacher_views):
        others = [s for s in range(student.shape[0]) if s != own]
        if not others:
            continue
        total = total + (-(p_t[t].unsqueeze(0) * log_p_s[others]).sum(dim=-1)).mean(dim=1).sum()
        pairs += len(others)
    if pairs == 0:
        raise ValueError("dino_loss needs at least one (teacher, other student view) pair")
    return total / pairs


@fp32
def clip_contrastive(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, max_scale: float = 100.0
) -> torch.Tensor:
    """CLIP's symmetric image-text cross-entropy (Radford et al. 2021, arXiv:2103.00020, figure 3).

    ``image`` and ``text``: [N, D] embeddings of N matching image-caption pairs (row i of each is a
    pair); both are L2-normalised here.  ``logit_scale``: the learnable 0-d log inverse temperature
    t (initialised to log(1/0.07)); the scale exp(t) is clipped at ``max_scale`` (100).  With
    s = min(exp(t), max_scale) and L = s · I·Tᵀ ([N, N]),

        loss = ½ [ CE(L, arange(N)) + CE(Lᵀ, arange(N)) ]

    the mean of the image→text cross-entropy over rows and the text→image one over columns.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(
            "clip_contrastive expects two [N, D] tensors of one shape, "
            f"got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    scale = logit_scale.exp().clamp(max=max_scale)
    logits = scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).t()
    targets = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
