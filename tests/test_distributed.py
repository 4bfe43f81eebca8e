"""Multi-process pieces: torchrun's environment, batch sharding, global-batch BN, gathered negatives, checkpoints.

The tests marked ``world`` run in two real CPU processes joined by gloo (tests/dist_harness.py);
the functions they run on every rank are the ``_on_ranks_*`` functions at the top of this file.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from clcli import dist
from clcli.engine import checkpoint as ckpt
from clcli.engine import distributed
from clcli.engine.ddp import StepModule, accumulating, any_rank, data_parallel, mean_over_ranks, sum_over_ranks
from clcli.engine.loader import EpochBatchSampler
from clcli.engine.sharding import ShardedBatchSampler, owner, shard, shard_bounds
from clcli.engine.syncbn import PortableSyncBatchNorm, convert_sync_batchnorm
from clcli.errors import DistributedError
from clcli.losses import nt_xent
from tests.dist_harness import RankFailed, World

# ------------------------------------------------------------------------- functions run on each rank


def _on_ranks_group_and_sharding(n: int, global_batch: int, seed: int, epoch: int, start: int) -> dict:
    """Rank info, and this rank's shards of an epoch gathered back in rank order."""
    info = distributed.current()
    sampler = ShardedBatchSampler(EpochBatchSampler(n, global_batch, seed, epoch, start), info.rank, info.world_size)
    gathered = [dist.gather_no_grad(torch.tensor(b, dtype=torch.long)).tolist() for b in sampler]
    return {
        "rank": info.rank,
        "world": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "main": distributed.on_main(lambda: "written"),
        "per_rank_batch": distributed.per_rank_batch(global_batch),
        "len": len(sampler),
        "gathered": [[tuple(item) for item in batch] for batch in gathered],
    }


def _bn_case(seed: int, counts: list[int], tail: tuple[int, ...], channels: int):
    torch.manual_seed(seed)
    x = torch.randn(sum(counts), channels, *tail) * 3 + 1
    upstream = torch.randn_like(x)  # loss = sum(y * upstream): a generic linear functional of the output
    bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(tail)]
    bn = bn_cls(channels, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
    return x, upstream, bn


def _on_ranks_sync_bn(seed: int, counts: list[int], tail: tuple[int, ...], channels: int) -> dict:
    """Portable sync BN on this rank's rows (uneven counts allowed) next to plain BN on all rows."""
    x, upstream, bn = _bn_case(seed, counts, tail, channels)
    ref = copy.deepcopy(bn)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * upstream).sum().backward()

    rank = dist.rank()
    lo = sum(counts[:rank])
    rows = slice(lo, lo + counts[rank])
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    x_mine = x[rows].clone().requires_grad_()
    y_mine = sync(x_mine)
    (y_mine * upstream[rows]).sum().backward()  # the global loss is the sum of the ranks' losses
    grads = {name: dist.all_reduce_sum(p.grad.clone()) for name, p in sync.named_parameters()}
    sync.eval()
    ref.eval()
    return {
        "kind": type(sync).__name__,
        "y": (y_mine.detach(), y_ref.detach()[rows]),
        "x_grad": (x_mine.grad, x_ref.grad[rows]),
        "weight_grad": (grads["weight"], ref.weight.grad),
        "bias_grad": (grads["bias"], ref.bias.grad),
        "running_mean": (sync.running_mean, ref.running_mean),
        "running_var": (sync.running_var, ref.running_var),
        "eval_y": (sync(x[rows]).detach(), ref(x[rows]).detach()),
    }


def _small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _on_ranks_sync_bn_ddp(seed: int, global_batch: int) -> dict:
    """A conv net with global-batch BN inside DistributedDataParallel against the whole batch in one process."""
    torch.manual_seed(seed)
    model = _small_convnet()
    x, target = torch.randn(global_batch, 3, 6, 6), torch.randn(global_batch, 2)
    ref = copy.deepcopy(model)
    ref_loss = nn.functional.mse_loss(ref(x), target)
    ref_loss.backward()

    start, stop = shard_bounds(global_batch, dist.rank(), dist.world_size())
    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(model)), broadcast_buffers=False)
    loss = nn.functional.mse_loss(ddp(x[start:stop]), target[start:stop])
    loss.backward()  # DDP averages the gradients over the ranks
    mean_loss = dist.all_reduce_mean(loss.detach().clone())
    return {
        "loss": (mean_loss, ref_loss.detach()),
        "grads": {n: (p.grad, dict(ref.named_parameters())[n].grad) for n, p in ddp.module.named_parameters()},
    }


def _on_ranks_simclr_grad(seed: int, global_batch: int, gather: bool) -> dict:
    """SimCLR on a linear encoder: negatives gathered with gradient, then gradients averaged over ranks."""
    torch.manual_seed(seed)
    encoder = nn.Linear(10, 6)
    x1, x2 = torch.randn(global_batch, 10), torch.randn(global_batch, 10)
    ref = copy.deepcopy(encoder)
    ref_loss = nt_xent(ref(x1), ref(x2), 0.5)
    ref_loss.backward()

    start, stop = shard_bounds(global_batch, dist.rank(), dist.world_size())
    z1, z2 = encoder(x1[start:stop]), encoder(x2[start:stop])
    if gather:
        z1, z2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    for p in encoder.parameters():
        dist.all_reduce_mean(p.grad)  # what DDP does
    return {
        "loss": (loss.detach(), ref_loss.detach()),
        "weight": (encoder.weight.grad, ref.weight.grad),
        "bias": (encoder.bias.grad, ref.bias.grad),
    }


class _KeptBatchNorm(nn.BatchNorm1d):
    """A batch norm subclass with its own rule (like MoCo's split BN): conversions must leave it alone."""


class _Regressor(nn.Module):
    """A stand-in method: its training step is an MSE regression."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
        self.kept = _KeptBatchNorm(5)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def _on_ranks_ddp_accumulation(seed: int, global_batch: int, accumulate: int) -> dict:
    """The trainer's data-parallel step: sync BN, DDP, accumulation with no_sync, against one process."""
    torch.manual_seed(seed)
    method = _Regressor()
    x, y = torch.randn(global_batch * accumulate, 5), torch.randn(global_batch * accumulate, 1)
    ref = copy.deepcopy(method)
    for k in range(accumulate):  # one process: micro-batch k is rows [k*B, (k+1)*B)
        rows = slice(k * global_batch, (k + 1) * global_batch)
        (ref.training_step((x[rows], y[rows]), 0) / accumulate).backward()

    module = data_parallel(method, torch.device("cpu"), sync_batchnorm=True, find_unused_parameters=True)
    start, stop = shard_bounds(global_batch, dist.rank(), dist.world_size())
    for k in range(accumulate):
        rows = slice(k * global_batch + start, k * global_batch + stop)
        with accumulating(module, last_micro_batch=k == accumulate - 1):
            (module((x[rows], y[rows]), 0) / accumulate).backward()
    return {
        "wrapped": type(module).__name__,
        "norms": [type(m).__name__ for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "grads": {
            n: (p.grad, dict(ref.named_parameters())[n].grad)
            for n, p in method.named_parameters()
            if p.grad is not None or dict(ref.named_parameters())[n].grad is not None
        },
        "any": (any_rank(dist.rank() == 1), any_rank(False)),
        "mean": float(mean_over_ranks(torch.tensor(float(dist.rank())))),
        "sum": sum_over_ranks(dist.rank() + 1, torch.device("cpu")),
    }


def _on_ranks_concurrent_writes(run_dir: str, rounds: int) -> int:
    """Both ranks write the same small file and checkpoints of their own into one run folder at once."""
    root = Path(run_dir)
    state = {"w": torch.full((3,), float(dist.rank()))}
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1).state_dict()
    dist.barrier()
    for i in range(rounds):
        ckpt.atomic_write_text(root / "provenance.json", f'{{"rank": {dist.rank()}, "round": {i}}}')
        ckpt.save_checkpoint(root, 1000 * (dist.rank() + 1) + i, state, opt, {"step": i}, keep=10_000)
    return rounds


def _on_ranks_fail_on_rank_one() -> None:
    if dist.rank() == 1:
        raise ValueError("rank one says no")
    dist.barrier()  # rank 0 now waits for a peer that will never come


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """Two gloo CPU processes for the whole module (started on first use)."""
    w = World(2)
    yield w
    w.close()


def close(pair: tuple[torch.Tensor, torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(pair[0], pair[1], atol=atol, rtol=rtol)


# -------------------------------------------------------------------------------- torchrun's env

LAUNCH = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launch_env_reads_torchrun_variables() -> None:
    env = distributed.launch_env(LAUNCH)
    assert env == distributed.LaunchEnv(rank=1, local_rank=1, world_size=2, master_addr="127.0.0.1", master_port=29500)
    assert distributed.launch_env({}) is None
    # a cluster-wide MASTER_ADDR/PORT alone is no launch
    assert distributed.launch_env({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({**LAUNCH, "MASTER_PORT": ""}, "MASTER_PORT is not"),
        ({**LAUNCH, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({**LAUNCH, "RANK": "2"}, "RANK=2 and WORLD_SIZE=2 do not fit"),
        ({**LAUNCH, "LOCAL_RANK": "3", "RANK": "1"}, "LOCAL_RANK=3 does not fit RANK=1"),
    ],
)
def test_launch_env_refuses_a_half_set_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedError, match=message):
        distributed.launch_env(env)


def test_no_torchrun_environment_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.REQUIRED_ENV:
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed(torch.device("cpu"))
    assert info == distributed.DistInfo(device=torch.device("cpu"))
    assert info.is_main and not info.distributed and not dist.is_distributed()
    assert distributed.on_main(lambda: 7) == 7
    assert distributed.main_only(lambda x: x + 1)(1) == 2
    distributed.teardown()  # nothing to end: a no-op


def test_per_rank_batch_splits_the_global_batch() -> None:
    assert distributed.per_rank_batch(256, 4) == 64
    assert distributed.per_rank_batch(10) == 10  # one process
    with pytest.raises(DistributedError, match=r"trainer.batch_size=10 is the global batch .* 3 processes.* 9 or 12"):
        distributed.per_rank_batch(10, 3)
    with pytest.raises(DistributedError, match="e.g. 4$"):
        distributed.per_rank_batch(3, 4)


# -------------------------------------------------------------------------------------- sharding


def test_shards_concatenate_to_the_one_process_batch() -> None:
    one = list(EpochBatchSampler(50, 12, seed=3, epoch=2, start=1))
    for world_size in (1, 2, 3, 4):
        ranks = [
            list(ShardedBatchSampler(EpochBatchSampler(50, 12, 3, 2, 1), r, world_size)) for r in range(world_size)
        ]
        assert all(len(r) == len(one) == 3 for r in ranks)
        rebuilt = [sum((ranks[r][b] for r in range(world_size)), []) for b in range(len(one))]
        assert rebuilt == one  # same images, same augmentation seeds, same order
    assert shard(list(range(8)), 1, 4) == [2, 3]
    assert [owner(p, 6, 3) for p in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    with pytest.raises(DistributedError, match="multiple of 5"):
        shard(list(range(12)), 0, 5)


def test_ranks_share_the_sampler_and_gather_the_global_batch(world: World) -> None:
    outs = world.run(_on_ranks_group_and_sharding, 40, 8, 5, 1, 2)
    assert [o["rank"] for o in outs] == [0, 1]
    assert {(o["world"], o["backend"], o["device"], o["per_rank_batch"]) for o in outs} == {(2, "gloo", "cpu", 4)}
    assert [o["main"] for o in outs] == ["written", None]
    expected = list(EpochBatchSampler(40, 8, 5, 1, 2))  # resumed at global batch 2
    assert outs[0]["len"] == len(expected) == 3
    assert outs[0]["gathered"] == outs[1]["gathered"] == expected


# ------------------------------------------------------------------------------------- sync BN


def test_sync_bn_is_plain_bn_in_one_process() -> None:
    model = _small_convnet()
    assert convert_sync_batchnorm(model) is model
    torch.manual_seed(0)
    bn, portable = nn.BatchNorm1d(3), PortableSyncBatchNorm(3)
    x = torch.randn(5, 3)
    torch.testing.assert_close(portable(x), bn(x))
    assert portable.state_dict().keys() == bn.state_dict().keys()


@pytest.mark.parametrize(("counts", "tail"), [([3, 5], (4, 3)), ([4, 4], ())])
def test_sync_bn_equals_bn_on_the_whole_batch(world: World, counts: list[int], tail: tuple[int, ...]) -> None:
    outs = world.run(_on_ranks_sync_bn, 11, counts, tail, 3)
    for out in outs:
        assert out["kind"] == "PortableSyncBatchNorm"
        for key in ("y", "x_grad", "weight_grad", "bias_grad", "running_mean", "running_var", "eval_y"):
            close(out[key])


def test_sync_bn_under_ddp_gives_the_whole_batch_gradient(world: World) -> None:
    outs = world.run(_on_ranks_sync_bn_ddp, 4, 8)
    for out in outs:
        close(out["loss"])
        for pair in out["grads"].values():
            close(pair)


def test_data_parallel_is_the_plain_step_in_one_process() -> None:
    method = _Regressor()
    module = data_parallel(method, torch.device("cpu"), sync_batchnorm=True)
    assert type(module) is StepModule and module.method is method
    assert not any(isinstance(m, PortableSyncBatchNorm) for m in method.modules())
    assert any_rank(True) and not any_rank(False) and sum_over_ranks(3, torch.device("cpu")) == 3


def test_ddp_with_accumulation_gives_the_one_process_gradient(world: World) -> None:
    for out in world.run(_on_ranks_ddp_accumulation, 3, 8, 2):
        assert out["wrapped"] == "DistributedDataParallel"
        assert out["norms"] == ["PortableSyncBatchNorm", "_KeptBatchNorm"]  # the subclass keeps its own rule
        assert out["any"] == (True, False) and out["mean"] == 0.5 and out["sum"] == 3
        assert len(out["grads"]) == 6  # the kept BN has no gradient (unused)
        for pair in out["grads"].values():
            close(pair)


# ---------------------------------------------------------------------------------- SimCLR grads


def test_gathered_negatives_give_simclrs_full_batch_gradient(world: World) -> None:
    outs = world.run(_on_ranks_simclr_grad, 2, 8, True)
    for out in outs:
        for key in ("loss", "weight", "bias"):
            close(out[key])
    # without the gather each rank contrasts only its own half: a different loss and gradient
    local = world.run(_on_ranks_simclr_grad, 2, 8, False)[0]
    assert not torch.allclose(*local["weight"], atol=1e-4)


# ----------------------------------------------------------------------------------- checkpoints


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tiny_checkpoint_args() -> tuple:
    return {"w": torch.zeros(2)}, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1).state_dict(), {"step": 1}


def test_temporary_names_are_unique_and_name_their_writer() -> None:
    a, b = ckpt.temp_suffix(), ckpt.temp_suffix()
    assert a != b and f"-{os.getpid()}-" in a


def test_checkpoint_cleanup_spares_a_live_writers_temporary(tmp_path: Path) -> None:
    root = tmp_path / ckpt.CKPT_DIR
    root.mkdir()
    host = ckpt.temp_suffix().rsplit("-", 2)[0]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = _dead_pid()
    try:
        names = {
            "live": f".tmp-step-00000007-{host}-{sleeper.pid}-0123abcd",
            "other_host": f".tmp-step-00000007-elsewhere-{dead}-0123abcd",
            "unknown": ".tmp-something-else",
            "dead": f".tmp-step-00000007-{host}-{dead}-0123abcd",
            "legacy_dead": f".tmp-step-00000007-{dead}",
            "own_leftover": f".tmp-step-00000003-{host}-{os.getpid()}-0123abcd",
        }
        for name in names.values():
            (root / name).mkdir()
            (root / name / "model.safetensors").write_bytes(b"half written")
        final = ckpt.save_checkpoint(tmp_path, 1, *_tiny_checkpoint_args())
        assert ckpt.is_complete(final)
        left = {p.name for p in root.iterdir()}
        assert {names[k] for k in ("live", "other_host", "unknown")} <= left
        assert not {names[k] for k in ("dead", "legacy_dead", "own_leftover")} & left
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_write_text_leaves_no_temporary_and_spares_live_ones(tmp_path: Path) -> None:
    host = ckpt.temp_suffix().rsplit("-", 2)[0]
    target = tmp_path / "provenance.json"
    live = tmp_path / f".provenance.json.tmp-{host}-{os.getppid()}-89abcdef"
    dead = tmp_path / f".provenance.json.tmp-{host}-{_dead_pid()}-89abcdef"
    live.write_text("another writer")
    dead.write_text("abandoned")
    # threads of one process write too: their temporaries never collide
    threads = [threading.Thread(target=ckpt.atomic_write_text, args=(target, f"writer {i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text().startswith("writer ")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


def test_two_processes_write_one_run_folder_without_collisions(world: World, tmp_path: Path) -> None:
    assert world.run(_on_ranks_concurrent_writes, str(tmp_path), 6) == [6, 6]
    root = tmp_path / ckpt.CKPT_DIR
    complete = sorted(p.name for p in root.glob("step-*") if ckpt.is_complete(p))
    assert len(complete) == 12
    assert not list(root.glob(".tmp-*")) and not list(tmp_path.glob(".*.tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path) is not None


# ---------------------------------------------------------------------------------- entry point


def test_python_dash_m_clcli_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "clcli", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "pretrain" in out.stdout


# ------------------------------------------------------------------------------------- harness


def test_a_failing_rank_fails_the_call_with_its_traceback(world: World) -> None:
    # last in the module: it kills the world (rank 0 is left waiting in a barrier)
    with pytest.raises(RankFailed, match=r"(?s)rank\(s\) \[0, 1\].*ValueError: rank one says no"):
        world.run(_on_ranks_fail_on_rank_one, timeout=60)


# ------------------------------------------------------------------------------ other commands


@pytest.mark.parametrize("rank", ["0", "1"])
def test_commands_other_than_pretrain_refuse_a_multi_process_launch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rank: str
) -> None:
    from typer.testing import CliRunner

    from clcli.cli import app

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    for name, value in {**LAUNCH, "RANK": rank, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "backbone.safetensors"
    for args in (["eval", "knn", "--run", str(tmp_path)], ["export", "--run", str(tmp_path), "--out", str(out)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        if rank == "0":  # the main process says why, once
            assert "runs in one process, and torchrun started 2" in res.output
        else:
            assert res.output == ""
    assert not out.exists()
