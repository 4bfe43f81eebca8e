"""Pipelines with a special output, made in batches: CPC's augmented patch grid.

:func:`apply_special` takes a group's views after crop and flip (float [B, 3, size, size] in [0, 1],
on any device) and returns what the pipeline outputs beyond a plain image:

* ``cpc`` (:mod:`clcli.views.patches`, CPC v2 arXiv:1905.09272): the patch grid [B, P, 3, p, p]
  with each patch's spatial jitter, colour jitter (fixed order brightness, contrast, saturation, hue),
  grayscale and colour dropping, computed by the same per-patch functions as the per-sample
  :class:`~clcli.views.patches.CPCPatches`, so given the same parameters both agree exactly (the
  per-sample pipeline then rounds to uint8; this returns floats);
* ``simclr`` and ``center``: the images unchanged.  (CMC's Lab split is no view op: the method
  converts its RGB views to Lab on the training device, already in batches.)

Per-sample draws (the view's stream, after crop and flip), for the parts the group has, per
patch: spatial jitter (2 P: rows, columns), colour jitter (5 P: apply, brightness, contrast,
saturation, hue), grayscale (P), colour drop (2 P: apply, kept channel; then 3 p² P standard normals
by the inverse normal CDF).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clcli.recipe import ViewGroup
from clcli.views.batched_color import jitter_ranges, move_params, supports_batched
from clcli.views.patches import colour_drop, grayscale_patches, grid_positions, jitter_patches
from clcli.views.sample_random import SampleRandom

__all__ = ["PatchParams", "apply_special", "cut_patches", "patch_views", "sample_patches"]


@dataclass(frozen=True)
class PatchParams:
    """Per-sample, per-patch parameters of a ``cpc`` group ([B, P] each; ``None`` for a part it lacks).

    ``tops``, ``lefts`` long: each patch's top-left corner (after spatial jitter); ``jitter_apply``
    bool and ``factors`` float [B, P, 4] (brightness, contrast, saturation, hue shift; ops the
    group skips hold identity values); ``grayscale``, ``drop`` bool; ``kept`` long (the channel a
    dropped patch keeps); ``noise`` float [B, P, 3, p, p] (standard normal).
    """

    tops: torch.Tensor
    lefts: torch.Tensor
    jitter_apply: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    drop: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PatchParams:
        """The same parameters on ``device``, moved in one copy."""
        return move_params(self, device)


def _base_corners(group: ViewGroup) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.tensor(grid_positions(group.size, group.patch_size, group.patch_stride), dtype=torch.long)
    return base[:, 0], base[:, 1]


def sample_patches(group: ViewGroup, rng: SampleRandom) -> PatchParams:
    """Draw a ``cpc`` group's per-patch parameters (on the CPU) in the layout of the module doc."""
    tops, lefts = _base_corners(group)
    n, b = tops.shape[0], len(rng)
    tops, lefts = tops.expand(b, n), lefts.expand(b, n)
    if group.patch_jitter > 0:
        j, hi = group.patch_jitter, group.size - group.patch_size
        u = rng.uniform(2 * n)
        shift = (u * (2 * j + 1)).floor().long().clamp_(max=2 * j) - j  # uniform on -j..j
        tops = (tops + shift[:, :n]).clamp(0, hi)
        lefts = (lefts + shift[:, n:]).clamp(0, hi)
    params: dict[str, torch.Tensor] = {"tops": tops.contiguous(), "lefts": lefts.contiguous()}
    ranges = jitter_ranges(group)
    if any(r is not None for r in ranges):
        u = rng.uniform(5 * n).view(b, 5, n)
        params["jitter_apply"] = u[:, 0] < group.jitter_p
        factors = torch.empty(b, n, 4, dtype=torch.float64)
        for i, r in enumerate(ranges):
            factors[..., i] = (1.0 if i < 3 else 0.0) if r is None else r[0] + (r[1] - r[0]) * u[:, 1 + i]
        params["factors"] = factors.float()
    if group.grayscale_p > 0:
        params["grayscale"] = rng.uniform(n) < group.grayscale_p
    if group.patch_color_drop_p > 0:
        u = rng.uniform(2 * n)
        params["drop"] = u[:, :n] < group.patch_color_drop_p
        params["kept"] = (u[:, n:] * 3).floor().long().clamp_(max=2)
        u = rng.uniform(n * 3 * group.patch_size**2) + 2.0**-54  # in (0, 1)
        params["noise"] = torch.special.ndtri(u).float().view(b, n, 3, group.patch_size, group.patch_size)
    return PatchParams(**params)


def cut_patches(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches [B, P, C, p, p] of x [B, C, H, W] with per-sample top-left corners ``tops``, ``lefts`` [B, P]."""
    b, c, _, w = x.shape
    n = tops.shape[1]
    offs = torch.arange(patch, device=x.device)
    rows = tops.to(x.device).view(b, n, 1, 1) + offs.view(1, 1, patch, 1)
    cols = lefts.to(x.device).view(b, n, 1, 1) + offs.view(1, 1, 1, patch)
    index = (rows * w + cols).view(b, 1, n * patch * patch).expand(b, c, -1)
    patches = x.flatten(2).gather(2, index).view(b, c, n, patch, patch)
    return patches.transpose(1, 2).contiguous()


def patch_views(x: torch.Tensor, group: ViewGroup, params: PatchParams) -> torch.Tensor:
    """A ``cpc`` group's augmented patch grid [B, P, 3, p, p] (float in [0, 1]) with explicit parameters."""
    if params.tops.device != x.device:
        params = params.to(x.device)
    patches = cut_patches(x, params.tops, params.lefts, group.patch_size)
    b, n = patches.shape[:2]
    flat = patches.flatten(0, 1)  # [B * P, 3, p, p]
    if params.factors is not None and params.jitter_apply is not None:
        f = params.factors.flatten(0, 1)
        parts = [f[:, i] if r is not None else None for i, r in enumerate(jitter_ranges(group))]
        flat = jitter_patches(flat, params.jitter_apply.flatten(), *parts)
    if params.grayscale is not None:
        flat = grayscale_patches(flat, params.grayscale.flatten())
    if params.drop is not None and params.kept is not None and params.noise is not None:
        flat = colour_drop(flat, params.drop.flatten(), params.kept.flatten(), params.noise.flatten(0, 1))
    return flat.view(b, n, *flat.shape[1:])


def apply_special(x: torch.Tensor, group: ViewGroup, rng: SampleRandom) -> torch.Tensor:
    """The group's special output from its views after crop and flip (float [B, 3, H, W] in [0, 1]).

    ``cpc``: the augmented patch grid [B, P, 3, p, p]; other pipelines: ``x`` unchanged.  Draws from
    ``rng`` (the view's stream, after the crop and flip draws).
    """
    if not supports_batched(group):
        raise ValueError(f"no batched version of the view pipeline {group.pipeline!r}")
    if group.pipeline != "cpc":
        return x
    if len(rng) != x.shape[0]:
        raise ValueError(f"{len(rng)} sample seeds for a batch of {x.shape[0]} images")
    return patch_views(x, group, sample_patches(group, rng).to(x.device))
