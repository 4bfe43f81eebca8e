"""CMC (arXiv:1906.05849): sRGB -> Lab, the two loss forms, the cross-view memory-bank contrast, the full
graph, resume, learning on real colour images, and the exported two-encoder composite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import build_method
from clcli.data.sources import limit_source, open_data
from clcli.errors import RecipeError
from clcli.losses import cmc_softmax, instdisc_nce
from clcli.methods.base import Batch
from clcli.schedules import make_plan
from clcli.views.color import LAB_RANGE, normalize_lab, rgb_to_lab
from clcli.views.pipelines import eval_pipeline

from .helpers import CIFAR, assert_exact_resume, fixed_batch, run_losses, tiny_recipe, trained_and_exported


def tiny(*extra: str):
    return tiny_recipe("cmc", *extra)


def build(recipe, n: int = 64):
    source = limit_source(open_data(recipe.data.source, recipe.data.train_split, recipe.data), n)
    return build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu"))


# ----------------------------------------------------------------------------- sRGB -> Lab
# CIE L*a*b* (D65, 2°) of the sRGB primaries, secondaries, white, black and mid-grey, as published
# (e.g. Bruce Lindbloom's and EasyRGB's calculators, scikit-image's rgb2lab).
REFERENCE_LAB = {
    (255, 255, 255): (100.0, 0.0, 0.0),
    (0, 0, 0): (0.0, 0.0, 0.0),
    (255, 0, 0): (53.2408, 80.0925, 67.2032),
    (0, 255, 0): (87.7347, -86.1827, 83.1793),
    (0, 0, 255): (32.2970, 79.1875, -107.8602),
    (255, 255, 0): (97.1393, -21.5537, 94.4780),
    (0, 255, 255): (91.1132, -48.0875, -14.1312),
    (255, 0, 255): (60.3242, 98.2343, -60.8249),
    (128, 128, 128): (53.5850, 0.0, 0.0),
}


def test_rgb_to_lab_matches_published_values_of_known_colours():
    rgb = torch.tensor(list(REFERENCE_LAB), dtype=torch.float64).t().reshape(3, 1, -1) / 255.0
    lab = rgb_to_lab(rgb.unsqueeze(0))[0, :, 0].t()
    for got, want in zip(lab.tolist(), REFERENCE_LAB.values(), strict=True):
        assert got == pytest.approx(want, abs=2e-3)


def _lab_scalar(r: float, g: float, b: float) -> tuple[float, float, float]:
    """CIE 1976 L*a*b* of one sRGB colour, written with Lindbloom's κ/ε form of the equations."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = (0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl) / 0.95047
    y = 0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl
    z = (0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl) / 1.08883
    eps, kappa = 216 / 24389, 24389 / 27

    def f(t: float) -> float:
        return t ** (1 / 3) if t > eps else (kappa * t + 16) / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_rgb_to_lab_matches_the_cie_equations_on_random_colours_and_batches():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.01  # dark: the linear branch of f
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape
    for b in range(2):
        for i in range(4):
            for j in range(5):
                want = _lab_scalar(*rgb[b, :, i, j].tolist())
                assert lab[b, :, i, j].tolist() == pytest.approx(want, abs=1e-9)
    # bf16 autocast does not touch the conversion; the output is float32 for float32 input
    x = rgb.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rgb_to_lab(x)
    assert out.dtype == torch.float32 and torch.allclose(out, rgb_to_lab(x))
    # the normalisation maps the sRGB gamut's extremes to [-1, 1]
    extremes = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float64).t().reshape(3, 1, 4)
    lab = rgb_to_lab(extremes)
    assert lab[1].min().item() == pytest.approx(LAB_RANGE[1][0], abs=1e-3)
    assert lab[1].max().item() == pytest.approx(LAB_RANGE[1][1], abs=1e-3)
    assert lab[2].min().item() == pytest.approx(LAB_RANGE[2][0], abs=1e-3)
    assert lab[2].max().item() == pytest.approx(LAB_RANGE[2][1], abs=1e-3)
    norm = normalize_lab(rgb_to_lab(torch.rand(3, 8, 8, generator=g)))
    assert norm.abs().max() <= 1.0 + 1e-4
    with pytest.raises(ValueError):
        rgb_to_lab(torch.rand(2, 4, 4))


# ------------------------------------------------------------------------------ the losses
def reference_softmax(anchor, positive, negatives, tau):
    total = 0.0
    for b in range(len(anchor)):
        pos = math.exp(float(np.dot(anchor[b], positive[b])) / tau)
        neg = sum(math.exp(float(np.dot(anchor[b], v)) / tau) for v in negatives[b])
        total += -math.log(pos / (pos + neg))
    return total / len(anchor)


def reference_nce(anchor, positive, negatives, tau, z, n):
    """NCE as CMC (after InstDisc) states it: h = P / (P + K Pn), P = exp(v·v'/τ) / Z, Pn = 1/n."""
    k = len(negatives[0])
    pn = 1.0 / n
    total = 0.0
    for b in range(len(anchor)):
        p_pos = math.exp(float(np.dot(anchor[b], positive[b])) / tau) / z
        total += -math.log(p_pos / (p_pos + k * pn))
        for v in negatives[b]:
            p = math.exp(float(np.dot(anchor[b], v)) / tau) / z
            total += -math.log(1 - p / (p + k * pn))
    return total / len(anchor)


def _scores(anchor, positive, negatives):
    pos = (anchor * positive).sum(dim=1, keepdim=True)
    return torch.cat([pos, torch.einsum("bkd,bd->bk", negatives, anchor)], dim=1)


def _unit(*shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_both_loss_forms_match_independent_computations(tau):
    g = torch.Generator().manual_seed(0)
    a, p, neg = _unit(5, 8, g=g), _unit(5, 8, g=g), _unit(5, 6, 8, g=g)
    scores = _scores(a, p, neg)
    got = cmc_softmax(scores, tau).item()
    assert got == pytest.approx(reference_softmax(a.numpy(), p.numpy(), neg.numpy(), tau), rel=1e-5)
    z, n = 37.5, 1000
    got = instdisc_nce(scores, tau, z, n).item()
    assert got == pytest.approx(reference_nce(a.numpy(), p.numpy(), neg.numpy(), tau, z, n), rel=1e-5)
    with pytest.raises(ValueError):
        cmc_softmax(scores[:, :1], tau)


@pytest.mark.parametrize("form", ["softmax", "nce"])
def test_each_view_is_contrasted_against_the_other_views_bank(form):
    """Planted banks: the step's loss is the sum over both directions of the hand-computed loss."""
    recipe = tiny(f"method.loss={form}", "method.temperature=0.2", "method.bank_init=random")
    method = build(recipe)
    n, k, d = 64, 32, 16
    g = torch.Generator().manual_seed(1)
    planted = [_unit(n, d, g=g).float(), _unit(n, d, g=g).float()]
    for bank, vectors in zip(method.banks, planted, strict=True):
        bank.vectors.copy_(vectors)
    x = torch.rand(4, 3, 16, 16, generator=g)
    index = torch.tensor([3, 10, 41, 7])
    batch = Batch([x], ["image"], index, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(123)
    out = method.training_step(batch, 0)
    torch.manual_seed(123)
    noise = torch.randint(0, n, (4, k))  # the draw the step made (uniform, one per anchor)
    with torch.no_grad():
        emb_l, emb_ab = (e.double().numpy() for e in method.view_embeddings(x))
    banks = [v.double().numpy() for v in planted]
    expected = 0.0
    for anchor, other in ((emb_l, 1), (emb_ab, 0)):  # L against the ab bank, ab against the L bank
        pos, neg = banks[other][index.numpy()], banks[other][noise.numpy()]
        if form == "softmax":
            expected += reference_softmax(anchor, pos, neg, 0.2)
        else:
            s = [math.exp(float(np.dot(anchor[b], v)) / 0.2) for b in range(4) for v in [pos[b], *neg[b]]]
            z = sum(s) / len(s) * n  # Monte-Carlo estimate from this first batch
            expected += reference_nce(anchor, pos, neg, 0.2, z, n)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    # after the loss, the batch's rows moved towards the new embeddings with momentum 0.5
    for bank, vectors, emb in zip(method.banks, planted, (emb_l, emb_ab), strict=True):
        mixed = 0.5 * vectors[index].double().numpy() + 0.5 * emb
        mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
        assert np.allclose(bank.vectors[index].double().numpy(), mixed, atol=1e-5)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(bank.vectors[untouched], vectors[untouched])
    # no gradient reaches the banks; the encoders of both views get one
    out.loss.backward()
    assert all(not b.vectors.requires_grad for b in method.banks)
    for enc in method.backbone.encoders:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    if form == "nce":
        z_first = method.nce_z.clone()
        assert bool(method.z_estimated) and torch.all(z_first[0, 1] > 0) and torch.all(z_first[1, 0] > 0)
        method.training_step(Batch([torch.rand(4, 3, 16, 16)], ["image"], index, index), 1)
        assert torch.equal(method.nce_z, z_first)  # held fixed after the first batch


def test_full_graph_over_three_views_sums_all_six_ordered_pairs():
    recipe = tiny("method.views=[L, a, b]", "method.loss=softmax", "method.bank_init=random")
    method = build(recipe)
    assert method.pairs == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert [len(c) for c in method.backbone.channels] == [1, 1, 1]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 16, 16, generator=g)
    index = torch.tensor([0, 1, 2, 3])
    banks = [b.vectors.clone().double().numpy() for b in method.banks]
    torch.manual_seed(5)
    loss = method.training_step(Batch([x], ["image"], index, index), 0).loss.item()
    torch.manual_seed(5)
    noise = torch.randint(0, 64, (4, 32)).numpy()
    with torch.no_grad():
        emb = [e.double().numpy() for e in method.view_embeddings(x)]
    expected = sum(
        reference_softmax(emb[i], banks[j][index.numpy()], banks[j][noise], 0.07)
        for i in range(3)
        for j in range(3)
        if i != j
    )
    assert loss == pytest.approx(expected, rel=1e-4)


def test_encoded_bank_init_fills_every_row_with_the_initial_embeddings_once():
    method = build(tiny("method.bank_init=encoded"))
    running = {k: v.clone() for k, v in method.state_dict().items() if "running" in k}
    assert method.on_epoch_start(0, 0) == {"banks_filled_rows": 64.0}
    # every row holds the embedding of that image's evaluation crop (one batch: batch statistics)
    x = torch.stack([eval_pipeline(16)(method._source.load_image(i)) for i in range(64)]).float() / 255.0
    state = method.state_dict()
    for k, v in running.items():
        assert torch.equal(state[k], v)  # the batch-norm running statistics are left alone
    with torch.no_grad():
        emb = method.view_embeddings(x)
    for bank, e in zip(method.banks, emb, strict=True):
        assert torch.allclose(bank.vectors, e, atol=1e-5)
    assert bool(method.banks_filled)
    # once per run: a later epoch (or a resumed run, whose flag comes from the checkpoint) does not refill
    method.banks[0].vectors.zero_()
    assert method.on_epoch_start(1, 4) == {}
    assert method.banks[0].vectors.abs().sum() == 0


def test_bad_recipes_give_clear_errors():
    with pytest.raises(RecipeError, match=r"views.mean"):
        build(tiny("views.mean=[0.5, 0.5, 0.5]"))
    with pytest.raises(RecipeError, match="one view per image"):
        build(tiny("views.groups.0.count=2"))
    with pytest.raises(RecipeError, match="share channels"):
        tiny("method.views=[La, ab]")
    with pytest.raises(RecipeError, match="Lab channels"):
        tiny("method.views=[L, xy]")


# -------------------------------------------------------------------- training and export
@pytest.mark.parametrize("form", ["nce", "softmax"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, form):
    recipe = tiny(f"method.loss={form}", "method.bank_init=encoded", "trainer.steps=6", "data.limit=48")
    # across an epoch boundary (3 steps per epoch)
    assert_exact_resume(recipe, tmp_path, stop_after=4)


@pytest.mark.skipif(not (CIFAR / "train.parquet").exists(), reason=f"CIFAR-10 parquet not found in {CIFAR}")
@pytest.mark.parametrize("form", ["softmax", "nce"])
def test_steps_lower_the_loss_on_real_colour_images(tmp_path, form):
    # CIFAR-10 (colour: the ab view of grayscale digits would be empty); one fixed batch of 32 images
    recipe = tiny(
        f"data.source={CIFAR / 'train.parquet'}",
        f"method.loss={form}",
        *fixed_batch(images=32, steps=20, lr=0.1),
        "method.nce_k=64",
        "views.groups.0.crop_scale=[0.6, 1.0]",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert sum(seq[-4:]) / 4 < sum(seq[2:6]) / 4 - 0.2


def test_export_rebuilds_both_encoders_and_gives_the_same_features(tmp_path):
    info, method, encoder = trained_and_exported(tiny("trainer.steps=2"), tmp_path)
    assert info["kind"] == "composite"
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = method.features(x)
        got = encoder(x)
        parts = [enc(v) for enc, v in zip(method.backbone.encoders, method.backbone.split(x), strict=True)]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(want, torch.cat(parts, dim=1))  # L features then ab features
    assert got.shape[1] == encoder.feature_dim == 2 * 32  # two convnets at half of width 8: 8 x 4 features each
    assert encoder.mean == (0.0, 0.0, 0.0) and encoder.std == (1.0, 1.0, 1.0)  # it takes RGB in [0, 1]
    assert encoder.metadata["extra"]["views"] == ["L", "ab"]
