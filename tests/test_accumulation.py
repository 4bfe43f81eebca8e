"""Gradient accumulation (``trainer.accumulate``) through the trainer's own loop.

The trainer back-propagates ``loss / k`` for each of k micro-batches and steps once.  For a loss that
is a mean of per-image terms, and a network without batch statistics (here a ViT, whose norms are
per-token LayerNorms, and heads with LayerNorm), that is the gradient of the loss of the whole batch
of k micro-batches.  For an in-batch contrastive loss such as NT-Xent (SimCLR, arXiv:2002.05709) it is
not: each micro-batch is its own contrast, its images see only each other as negatives, so the
accumulated gradient is the mean of the micro-batches' gradients and differs from the whole batch's.
Accumulation enlarges the batch the optimiser averages over, not the set of negatives.
"""

from __future__ import annotations

import copy

import torch

from clcli.assemble import prepare_training
from clcli.methods.base import Batch, Method

from .helpers import tiny_recipe

MICRO = 4  # micro-batches per step
MICRO_BATCH = 8  # images per micro-batch
# no batch statistics anywhere: a two-block ViT on 8 px views, LayerNorm in the heads
NO_BATCH_STATS = [
    "model.backbone.name=vit",
    "model.backbone.image_size=8",
    "model.backbone.patch_size=4",
    "model.backbone.dim=32",
    "model.backbone.depth=2",
    "model.backbone.heads=2",
    "views.groups.0.size=8",
    "views.eval_size=8",
    f"trainer.batch_size={MICRO_BATCH}",
    f"trainer.accumulate={MICRO}",
    "trainer.steps=1",
]


def grads(method: Method) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def accumulated_step(name: str, tmp_path, *extra: str) -> tuple[Method, list[Batch], dict[str, torch.Tensor]]:
    """One optimiser step of a run with ``MICRO`` micro-batches: the method as it was before the step,
    the micro-batches the trainer fed it, and the gradient the trainer held just before stepping."""
    stages = prepare_training(tiny_recipe(name, *NO_BATCH_STATS, *extra), tmp_path / "run")
    method = stages.method
    before = copy.deepcopy(method)
    fed: list[Batch] = []
    held: dict[str, torch.Tensor] = {}
    step, before_step = method.training_step, method.before_step

    def recording_step(batch: Batch, s: int):
        fed.append(batch)
        return step(batch, s)

    def capturing_before_step(s: int) -> None:
        held.update(grads(method))
        before_step(s)

    method.training_step = recording_step  # type: ignore[method-assign]
    method.before_step = capturing_before_step  # type: ignore[method-assign]
    assert stages.trainer.fit()["steps"] == 1
    assert [b.size for b in fed] == [MICRO_BATCH] * MICRO
    assert len(set(torch.cat([b.index for b in fed]).tolist())) == MICRO * MICRO_BATCH  # k different micro-batches
    return before, fed, held


def whole(batches: list[Batch]) -> Batch:
    """The micro-batches as one batch: each view concatenated along the images."""
    return Batch(
        [torch.cat(v) for v in zip(*(b.views for b in batches), strict=True)],
        batches[0].view_names,
        torch.cat([b.index for b in batches]),
        torch.cat([b.label for b in batches]),
    )


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in a)


def test_accumulated_byol_gradient_is_the_full_batch_gradient(tmp_path):
    before, fed, held = accumulated_step("byol", tmp_path, "views.groups.1.size=8", "method.head_norm=ln")
    before.train()
    before.training_step(whole(fed), 0).loss.backward()  # one pass over all 32 images
    full = grads(before)
    assert held.keys() == full.keys() and any(n.startswith("backbone.") for n in full)
    for n in full:
        assert torch.allclose(held[n], full[n], rtol=1e-4, atol=1e-7), n
    # the comparison has power: one micro-batch's gradient alone is far from it
    before.zero_grad()
    before.training_step(fed[0], 0).loss.backward()
    assert max_relative_difference(grads(before), full) > 0.1


def test_accumulated_simclr_gradient_is_the_mean_of_separate_contrasts_not_the_full_batch_gradient(tmp_path):
    before, fed, held = accumulated_step("simclr", tmp_path, "method.projector_norm=ln")
    before.train()
    for b in fed:  # each micro-batch its own NT-Xent over its 2 x 8 views
        (before.training_step(b, 0).loss / MICRO).backward()
    separate = grads(before)
    for n in separate:
        assert torch.allclose(held[n], separate[n], rtol=1e-4, atol=1e-7), n
    before.zero_grad()
    before.training_step(whole(fed), 0).loss.backward()  # one NT-Xent over all 2 x 32 views: more negatives
    assert max_relative_difference(held, grads(before)) > 0.05
