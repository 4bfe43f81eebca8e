"""CPC (arXiv:1807.03748, v2 arXiv:1905.09272): the patch grid, the causal context network, InfoNCE,
resume, learning on real images, and the exported composite encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import build_method
from clcli.errors import RecipeError
from clcli.losses import cpc_infonce
from clcli.methods.base import Batch
from clcli.methods.cpc import ContextNetwork, MaskedConv2d, orient
from clcli.recipe import load_recipe
from clcli.schedules import make_plan
from clcli.views.patches import CPCPatches, grid_positions, grid_size, patch_grid

from .helpers import assert_exact_resume, fixed_batch, run_losses, tiny_recipe, trained_and_exported


def tiny(*extra: str):
    return tiny_recipe("cpc", *extra)


def coordinate_image(size: int) -> torch.Tensor:
    """uint8 [3, size, size]: channel 0 holds the row, channel 1 the column, channel 2 a constant."""
    rows = torch.arange(size).view(size, 1).expand(size, size)
    cols = torch.arange(size).view(1, size).expand(size, size)
    return torch.stack([rows, cols, torch.full_like(rows, 7)]).to(torch.uint8)


def without_randomness(group, patch_jitter: int = 0):
    """The view group with its crop, flip and colour changes off; patches jittered by ``patch_jitter`` pixels."""
    return group.model_copy(
        update={
            "crop_scale": (1.0, 1.0),
            "crop_ratio": (1.0, 1.0),
            "hflip_p": 0.0,
            "patch_jitter": patch_jitter,
            "jitter_p": 0.0,
            "grayscale_p": 0.0,
            "patch_color_drop_p": 0.0,
        }
    )


# ------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("recipe", "size", "patch", "stride"), [("cpc", 32, 8, 4), ("cpc-imagenet", 256, 64, 32)])
def test_presets_cut_a_7x7_grid_of_half_overlapping_patches(recipe, size, patch, stride):
    group = load_recipe(recipe).views.groups[0]
    assert (group.pipeline, group.size, group.patch_size, group.patch_stride) == ("cpc", size, patch, stride)
    assert load_recipe(recipe).views.eval_size == size
    assert grid_size(size, patch, stride) == 7
    pos = grid_positions(size, patch, stride)
    assert len(pos) == 49
    assert pos[0] == (0, 0) and pos[6] == (0, 6 * stride) and pos[7] == (stride, 0) and pos[48] == (6 * stride,) * 2
    assert pos[48][0] + patch == size  # the grid covers the image exactly
    assert patch - stride == patch // 2  # each patch overlaps half of its neighbour

    # the pipeline without randomness cuts exactly these patches, in row-major order
    plain = without_randomness(group)
    image = coordinate_image(size)
    patches = CPCPatches(plain)(image)
    assert patches.shape == (49, 3, patch, patch) and patches.dtype == torch.uint8
    for n, (top, left) in enumerate(pos):
        assert torch.equal(patches[n], image[:, top : top + patch, left : left + patch])
    # neighbours share pixels: the right half of patch (0, 0) is the left half of patch (0, 1)
    assert torch.equal(patches[0][:, :, stride:], patches[1][:, :, : patch - stride])
    assert torch.equal(patches[0][:, stride:, :], patches[7][:, : patch - stride, :])
    # the evaluation cut (float batches) is the same grid
    batch = image.unsqueeze(0).float()
    assert torch.equal(patch_grid(batch, patch, stride)[0], patches.float())


def test_patchwise_augmentation_stays_on_the_grid_and_is_per_patch():
    group = without_randomness(load_recipe("cpc").views.groups[0], patch_jitter=2)
    image = coordinate_image(32)
    torch.manual_seed(0)
    patches = CPCPatches(group)(image)
    moved = 0
    for n, (top, left) in enumerate(grid_positions(32, 8, 4)):
        t, lft = int(patches[n, 0, 0, 0]), int(patches[n, 1, 0, 0])  # the patch's real corner
        assert abs(t - top) <= 2 and abs(lft - left) <= 2 and 0 <= t <= 24 and 0 <= lft <= 24
        assert torch.equal(patches[n], image[:, t : t + 8, lft : lft + 8])
        moved += (t, lft) != (top, left)
    assert moved > 20  # patches move independently

    colour = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    gray = CPCPatches(group.model_copy(update={"patch_jitter": 0, "grayscale_p": 0.5}))
    torch.manual_seed(2)
    out = gray(colour).int()
    is_gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 10 < int(is_gray.sum()) < 40  # about half the patches, chosen per patch
    drop = CPCPatches(group.model_copy(update={"patch_jitter": 0, "patch_color_drop_p": 1.0}))
    out = drop(colour).int()
    plain = patch_grid(colour, 8, 4).int()
    for n in range(49):
        same = [bool(torch.equal(out[n, c], plain[n, c])) for c in range(3)]
        assert sum(same) == 1  # one channel kept as it was
        for c in range(3):
            if not same[c]:
                assert (out[n, c] - 128).abs().max() <= 6  # the other two: grey + faint noise
    jitter = CPCPatches(group.model_copy(update={"patch_jitter": 0, "jitter_p": 1.0}))
    torch.manual_seed(3)
    a = jitter(colour)
    torch.manual_seed(3)
    assert torch.equal(a, jitter(colour))  # a pure function of the RNG state
    assert not torch.equal(a, patch_grid(colour, 8, 4))


# ---------------------------------------------------------------------------- causality
def test_masked_convolution_and_context_network_never_see_lower_rows():
    conv = MaskedConv2d(3, 4, 3)
    assert torch.all(conv.weight[:, :, 2] == 0) and torch.all(conv.mask[:, :, :2] == 1)
    torch.manual_seed(0)
    net = ContextNetwork(6, 8, blocks=3)
    z = torch.randn(2, 6, 7, 7)
    base = net(z)
    for i in range(7):
        changed = z.clone()
        changed[:, :, i + 1 :] = torch.randn_like(changed[:, :, i + 1 :]) * 10
        out = net(changed)
        assert torch.equal(out[:, :, : i + 1], base[:, :, : i + 1])  # rows up to and including i unchanged
        if i < 6:
            assert not torch.allclose(out[:, :, i + 1 :], base[:, :, i + 1 :])


@pytest.mark.parametrize("direction", ["top_down", "bottom_up", "left_right", "right_left"])
def test_each_prediction_depends_only_on_cells_before_its_target(direction):
    recipe = tiny("method.steps=3", "method.context_blocks=2", f"method.directions=[{direction}]")
    method = build_method(recipe, make_plan(recipe, 64), _digits(recipe), torch.device("cpu"))
    head = method.heads[direction]
    torch.manual_seed(0)
    grid = torch.randn(2, method.backbone.feature_dim, 7, 7, requires_grad=True)
    index = torch.arange(2 * 49).view(2, 7, 7)
    preds, targets = head(orient(grid, direction), orient(index, direction))
    assert preds.shape[0] == 2 * 7 * (6 + 5 + 4)
    # where each original cell sits along the prediction order (0 = first row predicted from)
    rank = torch.arange(7).view(7, 1).expand(7, 7)  # each cell's row
    order = {
        "top_down": rank,
        "bottom_up": 6 - rank,
        "left_right": rank.t(),
        "right_left": 6 - rank.t(),
    }[direction]
    # every prediction whose true patch is in image b at prediction-order row r, all offsets k together:
    # the union of what they depend on must lie in rows strictly before r, and in image b only
    image, cell = targets // 49, targets % 49
    target_rank = order.flatten()[cell]
    checked = 0
    for b in range(2):
        for r in range(1, 7):
            chosen = (image == b) & (target_rank == r)
            (g,) = torch.autograd.grad(preds[chosen].sum(), grid, retain_graph=True)
            seen = g[b].abs().sum(dim=0) > 0  # cells of image b these predictions depend on
            assert seen.any()
            assert torch.all(order[seen] < r)  # strictly before the predicted row
            assert g[1 - b].abs().sum() == 0  # nothing from the other image
            checked += int(chosen.sum())
    assert checked == preds.shape[0]


# ------------------------------------------------------------------------------ the loss
def reference_infonce(pred: np.ndarray, cand: np.ndarray, target: np.ndarray) -> float:
    total = 0.0
    for n in range(len(pred)):
        scores = [float(np.dot(pred[n], cand[m])) for m in range(len(cand))]
        top = max(scores)
        log_den = top + math.log(sum(math.exp(s - top) for s in scores))
        total += -(scores[int(target[n])] - log_den)
    return total / len(pred)


def test_cpc_infonce_matches_a_loop_over_the_equation():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(9, 5, generator=g, dtype=torch.float64)
    cand = torch.randn(12, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 12, (9,), generator=g)
    got = cpc_infonce(pred, cand, target).item()
    assert got == pytest.approx(reference_infonce(pred.numpy(), cand.numpy(), target.numpy()), rel=1e-5)
    with pytest.raises(ValueError):
        cpc_infonce(pred, cand[:, :4], target)


@pytest.mark.parametrize("v2_space", [False, True], ids=["v1-z-space", "v2-target-space"])
def test_method_loss_is_infonce_over_rows_below_against_every_patch_of_the_batch(v2_space):
    extra = (
        ["method.target_dim=3", "method.emb_scale=0.25"]
        if v2_space
        else ["method.target_dim=null", "method.emb_scale=1"]
    )
    recipe = tiny("method.steps=2", "method.directions=[top_down, bottom_up]", *extra)
    method = build_method(recipe, make_plan(recipe, 64), _digits(recipe), torch.device("cpu")).eval()
    torch.manual_seed(0)
    x = torch.randn(3, 49, 3, 4, 4)
    batch = Batch([x], ["grid"], torch.arange(3), torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        loss = method.training_step(batch, 0).loss.item()
        z = method.backbone.encode_patches(x)  # [3, 49, D]
        grid = z.view(3, 7, 7, -1).permute(0, 3, 1, 2)
        cand = z.reshape(3 * 49, -1).numpy().astype(np.float64)
        scale = 1.0
        assert (method.target is not None) == v2_space
        if v2_space:  # v2 (appendix A.2): candidates P z in a 3-d space, predictions scaled by 0.25
            proj = method.target.weight.numpy().astype(np.float64)  # [3, D]
            assert proj.shape == (3, z.shape[-1])
            cand = cand @ proj.T
            scale = 0.25
        pred, target = [], []
        for direction, flip in (("top_down", False), ("bottom_up", True)):
            head = method.heads[direction]
            c = head.context(grid.flip(2) if flip else grid)  # [3, Dc, 7, 7] in prediction order
            for k, w in zip((1, 2), head.predict, strict=True):
                for b in range(3):
                    for i in range(7 - k):
                        for j in range(7):
                            pred.append(scale * w(c[b, :, i, j]).numpy())
                            row = (6 - (i + k)) if flip else i + k  # the true patch, k rows further on
                            target.append(b * 49 + row * 7 + j)
    expected = reference_infonce(np.array(pred, dtype=np.float64), cand, np.array(target))
    assert loss == pytest.approx(expected, rel=1e-4)


def test_bad_recipes_give_clear_errors():
    with pytest.raises(RecipeError, match="pipeline: cpc"):
        _build(tiny("views.groups.0.pipeline=simclr"))
    with pytest.raises(RecipeError, match="smaller than the grid"):
        _build(tiny("method.steps=7"))
    with pytest.raises(RecipeError, match="ResNet"):
        _build(tiny("model.backbone.name=vit"))
    with pytest.raises(RecipeError, match="directions"):
        tiny("method.directions=[top_down, top_down]")


# -------------------------------------------------------------------- training and export
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    recipe = tiny("trainer.steps=5", "trainer.checkpoint_every=2", "method.directions=[top_down, left_right]")
    assert_exact_resume(recipe, tmp_path, stop_after=2)


def test_steps_lower_the_loss_on_real_images(tmp_path):
    recipe = tiny(
        *fixed_batch(images=32, steps=25, lr=3e-3),
        "method.encoder_width=8",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert seq[0] == pytest.approx(math.log(32 * 49), abs=0.5)  # chance: one of the batch's 1,568 patches
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3


def test_export_rebuilds_the_patch_grid_encoder_with_the_same_features(tmp_path):
    info, method, encoder = trained_and_exported(tiny("trainer.steps=2"), tmp_path)
    assert info["kind"] == "composite"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = method.features(x)
        got = encoder(x)
    assert got.shape == (3, method.backbone.feature_dim) == (3, encoder.feature_dim)
    assert torch.allclose(got, want, atol=1e-6)
    # the features are the mean of the patch vectors over the 7 x 7 grid
    with torch.no_grad():
        patches = patch_grid(x, 4, 2)
        manual = torch.stack([method.backbone.encoder(patches[b]).mean(dim=0) for b in range(3)])
    assert torch.allclose(want, manual, atol=1e-5)
    assert encoder.input_size == 16 and encoder.metadata["extra"]["patch_stride"] == 2


# ------------------------------------------------------------------------------- helpers
def _digits(recipe):
    from clcli.data.sources import limit_source, open_data

    return limit_source(open_data(recipe.data.source, recipe.data.train_split, recipe.data), recipe.data.limit)


def _build(recipe):
    return build_method(recipe, make_plan(recipe, 64), _digits(recipe), torch.device("cpu"))
