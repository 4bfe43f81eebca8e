"""Multi-crop: views declared as groups come in declared order, and the backbone runs once per resolution group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clcli.errors import RecipeError
from clcli.methods.multicrop import declared_view_names, multicrop_forward, resolution_runs, views_of
from clcli.recipe import ViewGroup, ViewsConfig
from clcli.views import ViewMaker


class Recorder(nn.Module):
    """A network without cross-sample coupling that records the batch shape of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.conv(x).mean(dim=(2, 3))


def make_views(sizes: list[int], batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def test_resolution_runs_are_the_consecutive_same_size_views():
    views = make_views([32, 32, 16, 16, 16, 32])
    assert resolution_runs(views) == [(0, 2), (2, 5), (5, 6)]
    assert resolution_runs(make_views([8])) == [(0, 1)]


def test_one_backbone_call_per_resolution_group_and_outputs_in_declared_order():
    net = Recorder()
    views = make_views([32, 32, 16, 16, 16, 16, 16, 16], batch=3)
    outs = multicrop_forward(net, views)
    # two calls: the 2 large crops together, then the 6 small ones together
    assert net.calls == [(6, 3, 32, 32), (18, 3, 16, 16)]
    assert len(outs) == 8
    for v, out in zip(views, outs, strict=True):
        assert torch.allclose(out, net.conv(v).mean(dim=(2, 3)), atol=1e-6)  # the view's own output, in order


def test_interleaved_sizes_keep_their_order():
    net = Recorder()
    views = make_views([16, 32, 32, 16], batch=2, seed=1)
    outs = multicrop_forward(net, views)
    assert [c[0] for c in net.calls] == [2, 4, 2]
    for v, out in zip(views, outs, strict=True):
        assert torch.allclose(out, net.conv(v).mean(dim=(2, 3)), atol=1e-6)


def test_views_kept_apart_do_not_share_batchnorm_statistics():
    bn_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(2)).train()
    views = make_views([16, 16, 16, 16], batch=4, seed=2)
    together = multicrop_forward(bn_net, views)
    apart = multicrop_forward(bn_net, views, apart=[0, 1])
    perturbed = [views[0], views[1], views[2] * 5 + 3, views[3] - 2]
    apart_perturbed = multicrop_forward(bn_net, perturbed, apart=[0, 1])
    # kept apart, the first two views' outputs do not depend on the others at all
    assert torch.equal(apart[0], apart_perturbed[0]) and torch.equal(apart[1], apart_perturbed[1])
    # run together, BatchNorm couples them (the reason for ``apart``)
    together_perturbed = multicrop_forward(bn_net, perturbed)
    assert not torch.allclose(together[0], together_perturbed[0])


def test_frozen_stats_views_train_as_usual_but_leave_the_running_statistics_alone():
    torch.manual_seed(0)

    def fresh() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(1)).train()

    net = fresh()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    views = make_views([16, 16, 8, 8], batch=4, seed=3)
    outs = multicrop_forward(net, views, frozen_stats=[2, 3], modules=[net])
    usual = fresh()
    usual.load_state_dict(initial)
    for a, b in zip(outs, multicrop_forward(usual, views), strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # the training computation is unchanged
    only_large = fresh()
    only_large.load_state_dict(initial)
    multicrop_forward(only_large, views[:2])
    # the running statistics saw the two large views only
    assert torch.allclose(net[1].running_mean, only_large[1].running_mean, atol=1e-6)
    assert torch.allclose(net[1].running_var, only_large[1].running_var, atol=1e-6)
    assert not torch.allclose(usual[1].running_mean, only_large[1].running_mean, atol=1e-4)
    assert net[1].momentum == 0.1  # restored afterwards
    with pytest.raises(ValueError, match="modules"):
        multicrop_forward(net, views, frozen_stats=[2])


def test_apart_positions_are_checked():
    with pytest.raises(ValueError, match="out of range"):
        multicrop_forward(Recorder(), make_views([8, 8]), apart=[2])
    with pytest.raises(ValueError, match="at least one view"):
        multicrop_forward(Recorder(), [])


def test_view_maker_emits_groups_in_declared_order_with_their_sizes():
    cfg = ViewsConfig(
        groups=[
            ViewGroup(name="global", size=32, count=2, crop_scale=(0.14, 1.0)),
            ViewGroup(name="local", size=16, count=6, crop_scale=(0.05, 0.14)),
        ]
    )
    maker = ViewMaker(cfg)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    views = maker(image)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16, 16, 16, 16]
    assert maker.names == declared_view_names(cfg.groups) == ["global"] * 2 + ["local"] * 6


def test_views_of_selects_groups_by_name_and_rejects_unknown_names():
    names = ["global1", "global2", "local", "local", "local"]
    assert views_of(names, ["global1", "global2"]) == [0, 1]
    assert views_of(names, ["local"]) == [2, 3, 4]
    with pytest.raises(RecipeError) as e:
        views_of(names, ["global"], "method.code_views")
    msg = str(e.value)
    assert "method.code_views" in msg and "'global'" in msg and "'global1'" in msg and "'local'" in msg
