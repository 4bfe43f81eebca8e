"""The lean training step: nothing read off the device between records, foreach/fused parameter
updates that compute what the per-tensor rules compute, the channels-last rule, compiled networks
that keep their checkpoints, and the non-finite guard before every checkpoint."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from clcli.assemble import prepare_training
from clcli.engine import checkpoint as ckpt
from clcli.engine.optim import LARS, build_optimizer, set_update_kernels, update_kernels
from clcli.engine.trainer import Trainer
from clcli.errors import TrainingError
from clcli.methods.base import ParamGroup, StepOutput
from clcli.methods.momentum import ema_update
from clcli.precision import use_channels_last
from clcli.recipe import OptimConfig, load_recipe

from .helpers import losses, tiny_recipe

CPU_AUTO = True  # measured: bench/notes/results/step_options.md (see clcli.precision.use_channels_last)
REPO = Path(__file__).resolve().parents[1]
CLCLI = str(REPO / "clcli")
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
# The step: the batch onto the device, forward and backward, the optimiser step with its hooks. The
# loop's own lines in trainer.py count too; its records, checkpoints (with their finite check),
# epoch set-up and online evaluation may read, and so may the data pipeline before the device.
STEP_PHASES = ("_to_batch", "_forward_backward", "_optimizer_step")
READING_PHASES = ("_log_interval", "_check_finite", "save", "_start_epoch", "_online_eval", "_summary")
TRAINER = str(Path(CLCLI) / "engine" / "trainer.py")
# MoCo's shuffle permutation is drawn on the host from tensors made there (never a device value), and so
# are the batched views' random parameters (per-sample counters from the collated seeds, crop boxes)
HOST_SIDE = {"grouped_shuffle", "_random_derangements", "sample_boxes"}
HOST_FILES = {str(Path(CLCLI) / "views" / "sample_random.py")}


@pytest.fixture
def device_reads(monkeypatch):
    """Patch every way Python reads a tensor's value; record the reads that this repository's code makes in
    the training step (or the loop around it, outside its reading phases) as (file, line, function, step)."""
    found: list[tuple[str, int, str, int]] = []
    depth = {"step": 0, "reading": 0}
    state: dict[str, Trainer] = {}

    def patched(name):
        real = getattr(torch.Tensor, name)

        @functools.wraps(real)
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            code = caller.f_code
            in_step = depth["step"] or code.co_filename == TRAINER
            ours = (
                code.co_filename.startswith(str(REPO))  # not torch's
                and code.co_name not in HOST_SIDE
                and code.co_filename not in HOST_FILES
            )
            if in_step and not depth["reading"] and ours:
                found.append((code.co_filename, caller.f_lineno, code.co_name, state["trainer"].state.step))
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, patched(name))

    def phase(name, kind):
        real = getattr(Trainer, name)

        @functools.wraps(real)
        def run(self, *args, **kwargs):
            state["trainer"] = self
            depth[kind] += 1
            try:
                return real(self, *args, **kwargs)
            finally:
                depth[kind] -= 1

        return run

    for name in STEP_PHASES:
        monkeypatch.setattr(Trainer, name, phase(name, "step"))
    for name in READING_PHASES:
        monkeypatch.setattr(Trainer, name, phase(name, "reading"))
    return found


@pytest.mark.parametrize(
    "name, extra",
    [
        ("simclr", ()),
        ("moco-v2", ()),
        ("byol", ()),
        ("simsiam", ()),
        ("swav", ("method.queue_start_epoch=0", "method.queue_length=64")),  # the queue fills, then is read
        ("dino", ()),
    ],
)
def test_steps_between_records_read_nothing_off_the_device(tmp_path, device_reads, name, extra):
    recipe = tiny_recipe(name, "trainer.steps=6", "trainer.log_every=3", "trainer.checkpoint_every=100", *extra)
    stages = prepare_training(recipe, tmp_path / "run")
    stages.trainer.fit()
    assert [r["step"] for r in stages.trainer.state.history if "loss" in r] == [3, 6]
    assert device_reads == []


def test_the_read_counter_sees_a_per_step_read(tmp_path, device_reads):
    # the same counter catches a method that turns its loss into a Python float at every step
    recipe = tiny_recipe("simclr", "trainer.steps=2", "trainer.log_every=2")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.method
    original = method.training_step

    def reading(batch, step):
        out = original(batch, step)
        return StepOutput(out.loss, {"loss_now": float(out.loss.detach())})

    method.training_step = reading  # type: ignore[method-assign]
    stages.trainer.fit()
    assert [r[2] for r in device_reads] == ["reading", "reading"]


@pytest.mark.parametrize("log_every", [3, 100])
def test_non_finite_loss_stops_before_the_next_checkpoint_at_any_log_interval(tmp_path, log_every):
    recipe = tiny_recipe("simclr", "trainer.steps=6", "trainer.checkpoint_every=2", f"trainer.log_every={log_every}")
    stages = prepare_training(recipe, tmp_path / "run")
    original = stages.method.training_step

    def poisoned(batch, step):
        out = original(batch, step)
        return StepOutput(out.loss * float("nan")) if step == 2 else out

    stages.method.training_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="non-finite"):
        stages.trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert not any(r.get("step", 0) > 2 and "loss" in r for r in stages.trainer.state.history)


# ------------------------------------------------------------------------------- updates
def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


@pytest.mark.parametrize("m", [0.9, 0.99, 0.996, 1.0])
def test_foreach_ema_equals_the_per_parameter_update_exactly(m):
    online, target = _net(0), _net(1)
    expected = copy.deepcopy(target)
    with torch.no_grad():
        for t, o in zip(expected.parameters(), online.parameters(), strict=True):
            t.mul_(m).add_(o, alpha=1.0 - m)
    ema_update(target, online, m)
    for a, b in zip(target.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _per_tensor_lars(params, group, state):
    """LARS as the per-tensor loop wrote it before the foreach version (the reference)."""
    with torch.no_grad():
        for p in params:
            d = p.grad
            if group["weight_decay"] != 0:
                d = d.add(p, alpha=group["weight_decay"])
            if group["lars"]:
                w, g = torch.norm(p), torch.norm(d)
                d = d.mul(torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w)))
            if group["momentum"] != 0:
                buf = state.get(p)
                if buf is None:
                    buf = state[p] = torch.clone(d).detach()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            p.add_(d, alpha=-group["lr"])


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_lars_foreach_update_equals_the_per_tensor_rule_exactly(nesterov, weight_decay):
    net, ref = _net(0), _net(0)
    cfg = OptimConfig(name="lars", weight_decay=weight_decay, nesterov=nesterov, momentum=0.9)
    opt = build_optimizer([ParamGroup("all", list(net.parameters()))], cfg, lr=0.3)
    assert isinstance(opt, LARS)
    ref_state: dict = {}
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model in (net, ref):
            model.zero_grad()
            model(x).square().mean().backward()
        opt.step()
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for p_net, p_ref in zip(net.parameters(), ref.parameters(), strict=True):
            _per_tensor_lars([p_ref], group_of[id(p_net)], ref_state)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_foreach_sgd_and_adamw_on_the_cpu_compute_what_the_per_tensor_loop_computes(name):
    nets = [_net(0), _net(0)]
    cfg = OptimConfig(name=name, weight_decay=1e-4, lr=0.1)
    opts = [build_optimizer([ParamGroup("all", list(n.parameters()))], cfg, 0.1, torch.device("cpu")) for n in nets]
    assert all(g["foreach"] for g in opts[0].param_groups)
    for group in opts[1].param_groups:
        group["foreach"] = False  # torch's per-tensor loop
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_update_kernels_are_fused_on_cuda_foreach_elsewhere_and_follow_a_resume():
    assert update_kernels(torch.device("cuda")) == {"fused": True, "foreach": None}
    assert update_kernels(torch.device("cpu")) == {"fused": None, "foreach": True}
    net = _net(0)
    opt = build_optimizer([ParamGroup("all", list(net.parameters()))], OptimConfig(), 0.1, torch.device("cpu"))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.update(fused=True, foreach=None)  # as a checkpoint written on a GPU holds them
    opt.load_state_dict(saved)
    set_update_kernels(opt, torch.device("cpu"))
    assert all(g["foreach"] is True and g["fused"] is None for g in opt.param_groups)


# -------------------------------------------------------------------------- memory format
def test_channels_last_auto_follows_the_device_rule_and_explicit_values_are_kept():
    assert load_recipe("simclr").trainer.channels_last == "auto"
    assert use_channels_last("auto", torch.device("cuda")) is True
    assert use_channels_last("auto", torch.device("cpu")) is CPU_AUTO
    for device in ("cpu", "cuda"):
        assert use_channels_last(True, torch.device(device)) is True
        assert use_channels_last(False, torch.device(device)) is False


@pytest.mark.parametrize("setting", ["true", "false"])
def test_the_trainer_puts_networks_and_batches_in_the_resolved_format(tmp_path, setting):
    stages = prepare_training(tiny_recipe("simclr", f"trainer.channels_last={setting}"), tmp_path / "run")
    trainer = stages.trainer
    conv = next(m for m in stages.method.modules() if isinstance(m, nn.Conv2d))
    on = setting == "true"
    assert trainer.channels_last is on
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is on
    cb = next(iter(trainer._batches()))
    view = trainer._to_batch(cb).views[0]
    assert view.is_contiguous(memory_format=torch.channels_last) is on


# -------------------------------------------------------------------------------- compile
def test_compiled_networks_train_the_same_and_keep_their_checkpoint_names(tmp_path, monkeypatch):
    # the eager backend traces with dynamo but runs the same kernels, so the losses must agree bitwise
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plain = tiny_recipe("simclr", "trainer.steps=3")
    compiled = tiny_recipe("simclr", "trainer.steps=3", "trainer.compile=true")
    stages = prepare_training(compiled, tmp_path / "compiled")
    assert stages.method.backbone._compiled_call_impl is not None
    stages.trainer.fit()
    prepare_training(plain, tmp_path / "plain").trainer.fit()
    assert losses(tmp_path / "compiled") == losses(tmp_path / "plain")
    names = set(ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "compiled")))
    assert names == set(ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "plain")))
