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
    b = float(q.shape[1])
    if all_reduce is not None:  # the global batch (one process knows its own size without asking the device)
        b = float(all_reduce(torch.tensor(b, device=q.device)))
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


# ------------------------------------------------------------------------------ InstDisc (NCE)
def _check_scores(scores: torch.Tensor, what: str) -> None:
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"{what} expects scores of shape [B, 1 + K] (K ≥ 1), got {tuple(scores.shape)}")


@fp32
@torch.no_grad()
def instdisc_nce_normaliser(scores: torch.Tensor, temperature: float, num_items: int) -> torch.Tensor:
    """Monte-Carlo estimate of InstDisc's normalising constant Z (Wu et al. 2018, arXiv:1805.01978, eq. 8).

    Z_i = Σ_j exp(v_jᵀ f_i / τ) over the n bank entries is approximated by n times the mean of
    exp(vᵀf/τ) over sampled entries; as in the official code the mean runs over all B × (1 + K)
    ``scores`` of the batch (layout as in :func:`instdisc_nce`, the positive column included),
    giving one constant Z that the method then holds fixed.  Returns a 0-d tensor, no gradient.
    """
    _check_scores(scores, "instdisc_nce_normaliser")
    return torch.exp(scores / temperature).mean() * num_items


@fp32
def instdisc_nce(scores: torch.Tensor, temperature: float, z: float | torch.Tensor, num_items: int) -> torch.Tensor:
    """NCE loss of non-parametric instance discrimination (Wu et al. 2018, arXiv:1805.01978, eqs. 4-7).

    ``scores``: [B, 1 + K] inner products vᵀf of each image's L2-normalised embedding f with memory
    bank entries: column 0 its own entry v_i (the positive), columns 1..K the K noise entries v_j
    drawn uniformly from the bank for that image; ``z``: the fixed normaliser Z; ``num_items``: n,
    the number of bank entries (the noise distribution is P_n = 1/n).  With

        P(i | f) = exp(v_iᵀ f / τ) / Z                       (eq. 4, Z held constant)
        h(i, f)  = P(i | f) / (P(i | f) + K·P_n)              (eq. 5: the posterior that i is data)
        J_NCE    = −(1/B) Σ_b [ log h(i_b, f_b) + Σ_{k=1..K} log(1 − h(j_bk, f_b)) ]   (eqs. 6-7)

    where j_bk are the noise entries of image b.  Computed in log space (the official code adds
    1e-7 to the denominators instead).  The gradient should reach f only; bank entries are constants.
    """
    import math

    _check_scores(scores, "instdisc_nce")
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    if not isinstance(z, torch.Tensor) and not z > 0:
        raise ValueError(f"the NCE normaliser Z must be positive, got {z}")
    k = scores.shape[1] - 1
    z = torch.as_tensor(z, dtype=scores.dtype, device=scores.device)
    log_noise = math.log(k / num_items)  # log(K · P_n)
    s = scores / temperature - torch.log(z)  # log P(i|f), [B, 1+K]
    log_denominator = torch.logaddexp(s, torch.full_like(s, log_noise))
    log_h_data = s[:, 0] - log_denominator[:, 0]
    log_1m_h_noise = log_noise - log_denominator[:, 1:]
    return -(log_h_data.sum() + log_1m_h_noise.sum()) / scores.shape[0]


@fp32
def instdisc_softmax(scores: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Full non-parametric softmax of InstDisc (Wu et al. 2018, arXiv:1805.01978, eqs. 2-3).

    ``scores``: [B, n] inner products v_jᵀf of each image's L2-normalised embedding f with all n
    memory-bank entries; ``index``: [B] the sample index i of each image.  With
    P(i | f) = exp(v_iᵀ f / τ) / Σ_{j=1..n} exp(v_jᵀ f / τ), the loss is −(1/B) Σ_b log P(i_b | f_b).
    """
    if scores.dim() != 2 or index.shape != (scores.shape[0],):
        raise ValueError(
            f"instdisc_softmax expects scores [B, n] and index [B], got {tuple(scores.shape)} and {tuple(index.shape)}"
        )
    return F.cross_entropy(scores / temperature, index.long())


# ------------------------------------------------------------------------------------ InvaSpread
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on both sides of −log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@fp32
def invaspread_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, detach_others: bool = True
) -> torch.Tensor:
    """Invariant and spreading instance loss of Ye et al. 2019 (arXiv:1904.03436, eqs. 1-4).

    ``z1`` and ``z2``: [B, D] embeddings of two augmented views of the same B images (row i of each
    is a pair); both are L2-normalised here.  Over the 2B embeddings f, every one is an anchor a
    with partner p(a) (the other view of its image).  With s_ak = f_aᵀ f_k / τ,

        P_a  = exp(s_a,p(a)) / Σ_{k≠a} exp(s_ak)      (the partner recognised as instance a)
        P_ak = exp(s_ak)     / Σ_{j≠a} exp(s_aj)      (another instance k recognised as a)
        loss = −(1/2B) Σ_a [ log P_a + Σ_{k∉{a, p(a)}} log(1 − P_ak) ]

    The sums over k and j run over the other 2B − 1 embeddings of both views; the second term
    spreads the instances apart (it is what distinguishes this loss from NT-Xent).  With
    ``detach_others`` (the official code's behaviour), the non-anchor factor f_k of every product
    f_aᵀ f_k is a constant, so the gradient reaches each embedding only through its own rows as an
    anchor; without it the gradient flows through both factors, as the equation reads.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"invaspread_loss expects two [B, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n < 2:
        raise ValueError("invaspread_loss needs at least two images per batch")
    f = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    other = f.detach() if detach_others else f
    logits = f @ other.t() / temperature  # [2B, 2B]
    eye = torch.eye(2 * n, dtype=torch.bool, device=f.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log P_ak for k ≠ a; −inf on the diagonal
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(f.device)
    rows = torch.arange(2 * n, device=f.device)
    log_p_pos = log_p[rows, partner]
    negatives = ~eye
    negatives[rows, partner] = False
    spread = _log1mexp(log_p.masked_fill(~negatives, -1.0)).masked_fill(~negatives, 0.0).sum(dim=1)
    return -(log_p_pos + spread).sum() / (2 * n)


@fp32
def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """MoCo's contrastive loss over one positive key and a queue of negatives (arXiv:1911.05722, eq. 1).

    ``q``: [N, D] queries; ``k``: [N, D] keys, row i the positive of query i; ``queue``: [K, D]
    negative keys shared by every query.  All three are L2-normalised here.  For each query,

        L_q = −log  exp(q·k₊/τ) / ( exp(q·k₊/τ) + Σ_{k₋ ∈ queue} exp(q·k₋/τ) )

    i.e. a (K+1)-way softmax cross-entropy whose label is the positive; the loss is the mean over
    the N queries.
    """
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            "moco_infonce expects q and k of one shape [N, D] and a queue [K, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(queue.shape)}"
        )
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@fp32
def mocov3_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float = 1.0,
    offset: int = 0,
) -> torch.Tensor:
    """MoCo v3's symmetrised contrastive loss (arXiv:2104.02057, Algorithm 1).

    ``q1``, ``q2``: [N, D] queries (predictor outputs) of views 1 and 2; ``k1``, ``k2``: [M, D]
    momentum-encoder keys of views 1 and 2 for the whole (gathered) batch, M ≥ offset + N; the
    positive of query i is key ``offset + i`` (``offset`` = this device's first row), every other
    key a negative.  With q and k L2-normalised,

        ctr(q, k) = 2τ · (1/N) Σ_i −log  exp(q_i·k_{offset+i}/τ) / Σ_{j<M} exp(q_i·k_j/τ)

    and the loss is ctr(q1, k2) + ctr(q2, k1).  The 2τ factor keeps the gradient's scale
    independent of τ.
    """
    for name, q, k in (("q1/k2", q1, k2), ("q2/k1", q2, k1)):
        if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1] or k.shape[0] < offset + q.shape[0]:
            raise ValueError(
                f"mocov3_loss ({name}) expects queries [N, D] and keys [M, D] with M >= offset + N, got "
                f"{tuple(q.shape)} and {tuple(k.shape)} with offset {offset}"
            )

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * temperature)

    return ctr(q1, k2) + ctr(q2, k1)


@fp32
def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised regression loss (Grill et al. 2020, arXiv:2006.07733, eq. 2).

    ``p1``, ``p2``: [N, D] online predictions q_θ(z_θ) of views 1 and 2; ``z1``, ``z2``: [N, D]
    target projections z′_ξ of views 1 and 2 (the caller passes them without gradient).  With
    q̄ = q/‖q‖ and z̄′ = z′/‖z′‖,

        L = ‖q̄ − z̄′‖² = 2 − 2·⟨q, z′⟩ / (‖q‖·‖z′‖)

    computed for (p1, z2) and, symmetrised, for (p2, z1): the result is the batch mean of
    L + L̃, between 0 and 8.
    """
    if not (p1.shape == p2.shape == z1.shape == z2.shape) or p1.dim() != 2:
        raise ValueError(
            "byol_loss expects four [N, D] tensors of one shape, got "
            f"{tuple(p1.shape)}, {tuple(p2.shape)}, {tuple(z1.shape)}, {tuple(z2.shape)}"
        )

    def regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=1, eps=1e-12)

    return (regression(p1, z2) + regression(p2, z1)).mean()


@fp32
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetrised negative cosine (Chen & He 2020, arXiv:2011.10566, eqs. 1-4).

    ``p1``, ``p2``: [N, D] predictor outputs of views 1 and 2; ``z1``, ``z2``: [N, D] projector
    outputs.  With D(p, z) = −(p/‖p‖)·(z/‖z‖),

        L = ½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1))

    averaged over the batch, between −1 and 1.  The stop-gradient is the caller's: this function
    differentiates through every input, so the method detaches ``z1``, ``z2`` (and can leave them
    attached for the paper's ablation without stop-gradient).
    """
    if not (p1.shape == p2.shape == z1.shape == z2.shape) or p1.dim() != 2:
        raise ValueError(
            "simsiam_loss expects four [N, D] tensors of one shape, got "
            f"{tuple(p1.shape)}, {tuple(p2.shape)}, {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    d12 = -F.cosine_similarity(p1, z2, dim=1, eps=1e-12).mean()
    d21 = -F.cosine_similarity(p2, z1, dim=1, eps=1e-12).mean()
    return 0.5 * d12 + 0.5 * d21


@fp32
def deepcluster_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """DeepCluster's classification loss on k-means pseudo-labels (Caron et al. 2018, arXiv:1807.05520, eq. 1).

    ``logits``: [N, k] scores g_W(f_θ(x_n)) of the freshly initialised classifier; ``pseudo_labels``:
    int64 [N] in [0, k), each image's k-means cluster y_n.  The loss is the multinomial logistic
    loss averaged over the batch, (1/N) Σ_n ℓ(g_W(f_θ(x_n)), y_n) with
    ℓ(s, y) = −log( exp(s_y) / Σ_j exp(s_j) ).
    """
    if logits.dim() != 2 or pseudo_labels.shape != logits.shape[:1]:
        raise ValueError(
            f"deepcluster_loss expects [N, k] logits and [N] labels, got {tuple(logits.shape)} and "
            f"{tuple(pseudo_labels.shape)}"
        )
    return F.cross_entropy(logits, pseudo_labels)


# ------------------------------------------------------------------------------------------ CPC
@fp32
def cpc_infonce(predictions: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """InfoNCE of contrastive predictive coding (van den Oord et al. 2018, arXiv:1807.03748, eq. 4).

    ``predictions``: [N, D] predicted patch vectors ẑ = W_k c_{i,j} (one row per context position
    and step k); ``candidates``: [M, D] the encoded patches z of the whole batch (every position of
    every image); ``targets``: [N] the row of ``candidates`` holding each prediction's true patch
    z_{i+k,j}.  The score is the log-bilinear f_k(z, c) = exp(zᵀ W_k c) (eq. 3), so with ẑ_n the
    n-th prediction

        L = −(1/N) Σ_n log [ exp(ẑ_nᵀ z_{t(n)}) / Σ_{m=1..M} exp(ẑ_nᵀ z_m) ]

    the negatives being all other patches of the batch: other positions of the same image and all
    positions of the other images (CPC v2, arXiv:1905.09272, eq. 2).  No temperature, no norm.
    v2's form (appendix A.2) is the same loss over projected candidates P z and predictions scaled
    by its ``emb_scale``; the caller passes those in.
    """
    if predictions.dim() != 2 or candidates.dim() != 2 or predictions.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"cpc_infonce expects predictions [N, D] and candidates [M, D], got {tuple(predictions.shape)} "
            f"and {tuple(candidates.shape)}"
        )
    if targets.shape != (predictions.shape[0],):
        raise ValueError(f"targets must have shape [{predictions.shape[0]}], got {tuple(targets.shape)}")
    return F.cross_entropy(predictions @ candidates.t(), targets.long())


# ------------------------------------------------------------------------------------------ CMC
@fp32
def cmc_softmax(scores: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Softmax cross-entropy form of CMC's two-view contrast (Tian et al. 2019, arXiv:1906.05849, eq. 2).

    ``scores``: [B, 1 + K] inner products of each anchor v¹ (one view of an image, L2-normalised)
    with the other view's memory-bank entries: column 0 the entry of the same image (the positive
    v²), columns 1..K the K entries drawn from that bank as negatives.  With h_θ(v¹, v²) =
    exp(v¹ᵀv² / τ),

        L^{V1,V2} = −(1/B) Σ_b log [ h_θ(v¹_b, v²_b) / (h_θ(v¹_b, v²_b) + Σ_{k=1..K} h_θ(v¹_b, v²_k)) ]

    CMC's NCE form of the same contrast is InstDisc's NCE (:func:`instdisc_nce`), which CMC adopts.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"cmc_softmax expects scores of shape [B, 1 + K] (K ≥ 1), got {tuple(scores.shape)}")
    targets = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, targets)
