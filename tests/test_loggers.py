"""Live metrics: TensorBoard event files beside metrics.jsonl, W&B on request, health measures at records only."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from clcli.engine import loggers
from clcli.errors import RecipeError
from clcli.methods.dino import DINO
from clcli.methods.health import collapse_measures, effective_rank, embedding_std, entropy
from clcli.methods.simclr import SimCLR
from clcli.recipe import load_recipe
from clcli.runs import read_metrics
from clcli.train import pretrain
from tests.helpers import build_context, tiny_recipe


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows for a run: (step, value) per tag, after its purge rules."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_health_measures_tell_collapse_from_spread() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 16, generator=g)
    collapsed = torch.ones(512, 16) + 1e-5 * torch.randn(512, 16, generator=g)
    rank_two = torch.randn(512, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert embedding_std(spread).item() == pytest.approx(16**-0.5, rel=0.05)
    assert embedding_std(collapsed).item() < 1e-4
    assert effective_rank(spread).item() > 14
    assert effective_rank(collapsed).item() < 1.05
    assert 1.2 < effective_rank(rank_two).item() < 2.05
    assert torch.isnan(effective_rank(torch.full((4, 4), float("nan"))))
    uniform = torch.full((3, 8), 1 / 8)
    assert entropy(uniform).item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-5)
    assert entropy(torch.eye(8)).item() == pytest.approx(0.0, abs=1e-6)


def test_method_health_reads_the_kept_tensors_and_dino_adds_its_centre() -> None:
    recipe = tiny_recipe("dino")
    dino = DINO(recipe.method, build_context(recipe))
    dino.center.fill_(0.5)
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    out = dino.health({"embedding": z})
    assert out["center_norm"].item() == pytest.approx(0.5 * recipe.method.out_dim**0.5, rel=1e-5)
    assert out["effective_rank"] == collapse_measures(z)["effective_rank"]
    assert dino.health({}) == {"center_norm": out["center_norm"]}


def test_health_is_computed_at_records_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = SimCLR.health

    def counted(self, saved):  # type: ignore[no-untyped-def]
        calls.append(saved["embedding"].shape)
        return original(self, saved)

    monkeypatch.setattr(SimCLR, "health", counted)
    pretrain(tiny_recipe("simclr", "trainer.log_every=3", "trainer.loggers=[jsonl]"), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(calls) == len(rows) == 2  # 6 steps, a record every 3: two SVDs, not six
    assert calls[0] == (64, 16)  # both views of the batch of 32, projected to 16 dimensions
    for r in rows:
        assert 1 <= r["effective_rank"] <= 16 and 0 < r["embedding_std"] < 1
        assert r["weight_decay"] == pytest.approx(tiny_recipe("simclr").optim.weight_decay)


def test_tensorboard_shows_what_metrics_jsonl_records(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install 'clcli[report]')")
    run = tmp_path / "run"
    pretrain(tiny_recipe("moco-v2", "trainer.log_every=2"), run)
    rows = [r for r in read_metrics(run) if "loss" in r]
    shown = _scalars(run)
    assert shown["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [v for _, v in shown["schedule/lr"]] == pytest.approx([r["lr"] for r in rows])
    for tag in ("schedule/ema_momentum", "schedule/weight_decay", "health/pos_sim", "health/effective_rank"):
        assert [s for s, _ in shown[tag]] == [2, 4, 6], tag
    assert "train/images_per_s" in shown


def test_resume_hides_the_events_written_after_the_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install 'clcli[report]')")
    recipe = tiny_recipe("simclr", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5")
    run = tmp_path / "run"
    pretrain(recipe, run)
    for late in sorted((run / "checkpoints").glob("step-*"))[1:]:  # as if the run died right after step 2's checkpoint
        shutil.rmtree(late)
    pretrain(recipe, run, resume=True)
    steps = [s for s, _ in _scalars(run)["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: the first run's steps 3-6 are purged

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted((run / loggers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load() if e.HasField("session_log")]
    assert starts == [3]  # the resumed writer's purge point: the step after its checkpoint


def test_loggers_without_tensorboard_writes_no_event_files(tmp_path: Path) -> None:
    pretrain(tiny_recipe("simclr", "trainer.steps=2", "trainer.loggers=[jsonl]"), tmp_path / "run")
    assert not (tmp_path / "run" / loggers.TENSORBOARD_DIR).exists()
    assert read_metrics(tmp_path / "run")


def test_jsonl_is_always_in_the_recipe_and_unknown_loggers_are_refused() -> None:
    assert load_recipe("simclr").trainer.loggers == ["jsonl", "tensorboard"]
    with pytest.raises(RecipeError, match="trainer.loggers"):
        load_recipe("simclr", ["trainer.loggers=[mlflow]"])


def test_wandb_without_the_package_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loggers, "installed", lambda name: name != "wandb")
    with pytest.raises(RecipeError, match="wandb package is not installed"):
        pretrain(tiny_recipe("simclr", "trainer.loggers=[jsonl, wandb]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_logs_offline_in_the_run_folder_and_keeps_its_run_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inits: list[dict] = []
    logged: list[tuple[int, dict]] = []

    class FakeRun:
        def log(self, values: dict, step: int) -> None:
            logged.append((step, values))

        def finish(self) -> None:
            logged.append((-1, {}))

    def init(**kwargs):  # type: ignore[no-untyped-def]
        inits.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(loggers, "installed", lambda name: True)
    recipe = tiny_recipe("simclr", "trainer.loggers=[wandb]", "trainer.log_every=3")
    run = tmp_path / "run"
    pretrain(recipe, run)
    assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(run) and inits[0]["project"] == "clcli"
    assert inits[0]["config"] == recipe.to_dict()
    assert [(s, v["train/loss"]) for s, v in logged if "train/loss" in v] == [
        (r["step"], pytest.approx(r["loss"])) for r in read_metrics(run) if "loss" in r
    ]
    assert logged[-1] == (-1, {})  # the W&B run is finished when training ends
    pretrain(recipe, run, resume=True)
    assert inits[1]["id"] == inits[0]["id"] and inits[1]["resume"] == "allow"


def test_a_missing_tensorboard_is_one_readable_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr(loggers, "installed", lambda package: package != "tensorboard")
    console = Console(record=True, width=200)
    opened = loggers.open_loggers(tiny_recipe("simclr"), tmp_path, start_step=0, enabled=True, console=console)
    text = console.export_text()
    # the extra and the list keep their brackets (printed without rich markup), and nothing is written
    assert "pip install 'clcli[report]'" in text and "trainer.loggers=[jsonl]" in text
    assert not (tmp_path / "tensorboard").exists()
    opened.close()
