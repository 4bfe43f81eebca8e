"""Benchmark scripts: the GPU check's job handling (a stand-in Python records each call), the recipe hash
that rows carry, the bars summary that selects rows by it, and what bench/ holds."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402  (bench/ is a folder of scripts, not a package)

from clcli.recipe import load_recipe  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def bench_copy(tmp_path: Path) -> Path:
    """A copy of bench/'s scripts in a folder of its own, so their results are written there, not in the checkout."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    for script in (ROOT / "bench").glob("*.py"):
        shutil.copy(script, repo / "bench" / script.name)
    return repo


def run_script(repo: Path, *args: str, timeout: int = 600) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's clcli (and its recipes)
    subprocess.run(
        [sys.executable, *args], cwd=repo / "bench", env=env, capture_output=True, check=True, timeout=timeout
    )


def run_gpu_check(tmp_path: Path, *jobs: str, **env: str) -> list[str]:
    calls = tmp_path / "calls"
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        f'case "$1" in quality.py|resume_check.py|speed.py) echo "$*" >> {calls}; exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    repo = tmp_path / "repo"  # a copy of the script beside an empty bench/, so nothing is written in the checkout
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_check.sh", repo / "bench" / "gpu_check.sh")
    for name in ("method.projector=5", "method.predictor=6"):  # what [512,512,128] would match as a file pattern
        (repo / "bench" / name).touch()
    subprocess.run(
        ["bash", "bench/gpu_check.sh", *jobs],
        cwd=repo,
        env={**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out"), "DEADLINE": "100000", **env},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return calls.read_text().splitlines() if calls.exists() else []


@needs_bash
def test_gpu_check_runs_command_line_and_file_jobs_with_their_overrides(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# a comment, then a blank line\n\n"
        "ss-small   simsiam 3 method.projector=[512,512,128] method.predictor=[64,128]\n"
        "base-cmc   untrained-cmc 1\n"
    )
    data = tmp_path / "cifar"
    data.mkdir()
    calls = run_gpu_check(tmp_path, "swav:2", JOBS=str(jobs), DATA=str(data), RESUME="simclr")
    quality = [c for c in calls if c.startswith("quality.py")]
    assert quality[0].startswith("quality.py swav --seed 2 --name swav-gpu ")
    assert quality[1].startswith(
        "quality.py simsiam --seed 3 --name ss-small --workers 8 "
        "--set method.projector=[512,512,128] --set method.predictor=[64,128] "
    )  # the overrides arrive as written, not expanded as file patterns
    assert quality[2].startswith("quality.py untrained --baseline-recipe cmc --seed 1 --name base-cmc ")
    assert all(c.endswith(f"--data {data}") for c in quality)  # an absolute path, though the runs start in bench/
    resume = [c for c in calls if c.startswith("resume_check.py")]
    assert [c.split("--set ")[1].split()[0] for c in resume] == [
        "trainer.deterministic=false",
        "trainer.deterministic=true",
    ]
    speed = [c for c in calls if c.startswith("speed.py")]
    assert speed[0].startswith("speed.py simclr swav cmc --batch 256 --precision bf16 fp32 ")
    assert speed[1].startswith("speed.py simclr ") and "--set trainer.deterministic=true" in speed[1]


@needs_bash
def test_gpu_check_skips_jobs_that_would_not_fit_the_deadline(tmp_path):
    calls = run_gpu_check(tmp_path, "simclr:0", DEADLINE="40")  # too short for a run and for the speed table
    assert calls == []
    assert "skip simclr-gpu seed 0 (time)" in (tmp_path / "out" / "main.log").read_text()


def test_recipe_hash_sees_what_a_run_computes_and_not_where_it_ran():
    budget = _common.quality_overrides(
        Path("/a/cifar10"), epochs=1, batch=128, precision="bf16", seed=0, k=200, temperature=0.1, workers=1
    )
    base = _common.recipe_hash(load_recipe("simclr", budget))
    assert len(base) == 64 and int(base, 16) >= 0
    elsewhere = _common.quality_overrides(
        Path("/elsewhere/cifar10"), epochs=1.0, batch=128, precision="bf16", seed=3, k=200, temperature=0.1, workers=8
    )
    same = [*elsewhere, "trainer.log_every=1", "trainer.device=cuda", "description=other words"]
    same += ["trainer.channels_last=true", "trainer.compile=true"]  # how it computes, not what
    assert _common.recipe_hash(load_recipe("simclr", same)) == base  # seed, machine, logging, prose: left out
    for change in ("optim.lr=0.1", "trainer.precision=fp32", "trainer.epochs=4", "eval.knn_k=20", "data.limit=10"):
        assert _common.recipe_hash(load_recipe("simclr", [*budget, change])) != base, change
    assert _common.recipe_hash(load_recipe("simsiam", budget)) != base
    assert base in _common.preset_hashes("simclr")  # the bench's CIFAR-10 folder is named cifar10 too
    assert len(_common.preset_hashes("simclr")) == 2  # bf16 and its fp32 fallback


@pytest.mark.skipif(not (CIFAR / "train.parquet").exists(), reason="needs ../shared/data/cifar10")
@pytest.mark.parametrize("preset", ["simclr", "moco-v2", "byol", "simsiam", "swav", "dino", "cmc", "cpc"])
def test_presets_still_find_their_recorded_quality_rows(preset):
    # A new recipe field changes every preset's hash unless it is in HASH_DROPPED (it does not change what a
    # run computes) or changes the recipe for real: then bars.py would silently stop counting the old rows.
    recorded = {r.get("recipe_hash") for r in json.loads((ROOT / "bench" / "results" / "quality.json").read_text())}
    assert _common.preset_hashes(preset) & recorded, f"no quality row of {preset} matches its preset's hash today"


def test_quality_row_carries_the_hash_of_the_recipe_it_ran_and_bars_counts_it(tmp_path):
    import pyarrow.parquet as pq

    data = tmp_path / "cifar10"  # a small CIFAR-10: enough for one batch of 128 and a kNN
    data.mkdir()
    pq.write_table(pq.read_table(CIFAR / "train.parquet").slice(0, 160), data / "train.parquet")
    pq.write_table(pq.read_table(CIFAR / "test.parquet").slice(0, 40), data / "test.parquet")
    repo = bench_copy(tmp_path)
    run_script(repo, "quality.py", "untrained", "--data", str(data), "--workers", "0", "--workdir", str(tmp_path / "w"))
    (row,) = json.loads((repo / "bench" / "results" / "quality.json").read_text())
    (saved,) = (tmp_path / "w").glob("untrained-*/recipe.yaml")
    ran = load_recipe(saved)
    assert row["recipe_hash"] == _common.recipe_hash(ran)  # the recipe as run, precision included
    assert row["precision"] == ran.trainer.precision
    assert row["recipe_hash"] in _common.preset_hashes("simclr") and row["steps"] == 0
    run_script(repo, "bars.py")
    table = (repo / "bench" / "results" / "bars.md").read_text()
    assert f"- torchvision init (the presets): s0 {row['knn_top1']:.3f}" in table


def test_speed_and_resume_rows_carry_a_recipe_hash(tmp_path):
    repo = bench_copy(tmp_path)
    tiny = ["--data", "embedded:digits", "--batch", "16", "--workers", "0"]
    sets = ["model.backbone.name=convnet", "model.backbone.width=8", "views.groups.0.size=16", "views.eval_size=16"]
    sets += ["trainer.precision=fp32"]
    speed_args = ["--precision", "fp32", "--steps", "1", "--warmup", "1", *[a for s in sets[:-1] for a in ("--set", s)]]
    run_script(repo, "speed.py", "simclr", *tiny, *speed_args)
    speed = json.loads((repo / "bench" / "results" / "speed.json").read_text())
    run_script(
        repo, "resume_check.py", "simclr", *tiny, "--limit", "64", "--steps", "3", "--cut", "1", "--device", "cpu",
        *[a for s in sets for a in ("--set", s)],
    )  # fmt: skip
    resume = json.loads((repo / "bench" / "results" / "resume.json").read_text())
    for row in (*speed, *resume):
        assert len(row["recipe_hash"]) == 64
    assert resume[0]["resume_exact"] is True
    overrides = [
        "data.source=embedded:digits",
        "data.limit=64",
        "trainer.batch_size=16",
        "trainer.steps=3",
        *sets,
    ]
    assert resume[0]["recipe_hash"] == _common.recipe_hash(load_recipe("simclr", overrides))


# A tiny network on the embedded digits for the protocol and peer tests (what every recipe below accepts).
_TINY_SETS = ["model.backbone.name=convnet", "model.backbone.width=8", "views.groups.0.size=16", "views.eval_size=16"]


def test_long_protocol_stops_at_the_time_limit_and_resume_finishes_every_recipe(tmp_path):
    repo = bench_copy(tmp_path)
    args = ["simclr", "simsiam", "--data", "embedded:digits", "--epochs", "2", "--batch", "32", "--knn-every", "1"]
    args += ["--precision", "fp32", "--workers", "0", "--runs", str(tmp_path / "runs")]
    args += [a for s in [*_TINY_SETS, "data.limit=64", "trainer.threads=1"] for a in ("--set", s)]
    run_script(repo, "long.py", *args, "--time-limit", "0")  # stops after simclr's first step; simsiam waits
    results = repo / "bench" / "results" / "long.json"
    (first,) = json.loads(results.read_text())
    assert first["method"] == "simclr" and first["steps"] == 1 and not first["finished"]
    assert first["knn_curve"] == [] and first["lightly"] == 0.848 and not first["lightly_same_setting"]
    with pytest.raises(subprocess.CalledProcessError):  # a started run is continued only when asked
        run_script(repo, "long.py", *args, "--time-limit", "600")
    run_script(repo, "long.py", *args, "--time-limit", "600", "--resume")
    rows = {r["method"]: r for r in json.loads(results.read_text())}
    assert set(rows) == {"simclr", "simsiam"}
    for name, row in rows.items():
        assert row["finished"] and row["steps"] == row["total_steps"] == 4  # 64 images of 32: two steps an epoch
        assert [e for e, _ in row["knn_curve"]] == [1, 2], name
        assert all(0.0 <= v <= 1.0 for _, v in row["knn_curve"]) and row["seconds_per_epoch"] > 0
        assert len(row["recipe_hash"]) == 64
    assert rows["simclr"]["invocations"] == 2 and rows["simsiam"]["invocations"] == 1
    assert "| simsiam |" in (repo / "bench" / "results" / "long.md").read_text()


def test_peer_speed_measures_clcli_and_lightly_side_by_side(tmp_path):
    pytest.importorskip("lightly")
    repo = bench_copy(tmp_path)
    args = ["--peer", "simclr", "moco-v2", "--data", "embedded:digits", "--batch", "16", "--workers", "0"]
    args += [
        "--precision",
        "fp32",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--clock",
        "cpu",
    ]
    run_script(repo, "speed.py", *args, *[a for s in _TINY_SETS for a in ("--set", s)])
    rows = json.loads((repo / "bench" / "results" / "speed.json").read_text())
    assert sorted((r["method"], r["impl"]) for r in rows) == [
        ("moco-v2", "clcli"),
        ("moco-v2", "lightly"),
        ("simclr", "clcli"),
        ("simclr", "lightly"),
    ]
    for r in rows:
        assert r["images_per_s"] > 0 and r["model_step_s"] > 0 and len(r["recipe_hash"]) == 64
        assert r["clock"] == "cpu"
    ours, theirs = (next(r for r in rows if r["method"] == "simclr" and r["impl"] == i) for i in ("clcli", "lightly"))
    assert ours["ratio_images_per_s"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"], rel=0.01)
    table = (repo / "bench" / "results" / "peer.md").read_text()
    assert table.count("| 16 | fp32 | cpu | cpu |") == 2


def _row(
    method: str, seed: int, knn: float, when: str, recipe_hash: str | None, steps: int = 390, epochs: float = 1
) -> dict:
    return {
        "method": method,
        "seed": seed,
        "knn_top1": knn,
        "when": when,
        "overrides": [],
        "epochs": epochs,
        "steps": steps,
        "recipe_hash": recipe_hash,
    }


_PINIT = ("model.backbone.init=pytorch",)


def _hash(recipe: str, *overrides: str, epochs: float = 1, precision: str = "bf16") -> str:
    budget = _common.quality_overrides(
        _common.CIFAR, epochs=epochs, batch=128, precision=precision, seed=0, k=200, temperature=0.1
    )
    return _common.recipe_hash(load_recipe(recipe, [*budget, *overrides]))


def test_bars_select_rows_by_recipe_hash_pool_seeds_and_pair_them_with_the_untrained_seed(tmp_path):
    simclr, simsiam, swav = _hash("simclr"), _hash("simsiam"), _hash("swav")
    stale = _hash("swav", "method.queue_length=0")  # another recipe, whatever the row is called
    rows = [
        _row("untrained", 0, 0.36, "2026-11-28T10:00:00+00:00", simclr, steps=0),
        _row("untrained-gpu", 1, 0.34, "2026-12-05T10:00:00+00:00", _hash("simclr", precision="fp32"), steps=0),
        _row("simsiam", 0, 0.38, "2026-11-28T12:00:00+00:00", simsiam),
        _row("simsiam-h200", 0, 0.40, "2026-12-04T12:00:00+00:00", simsiam),  # the same seed on another device
        _row("anything", 1, 0.35, "2026-12-05T12:00:00+00:00", simsiam),  # the name does not matter
        _row("simsiam", 1, 0.99, "2026-12-05T13:00:00+00:00", _hash("simsiam", "optim.lr=9")),  # not the preset
        _row("simsiam", 2, 0.98, "2026-12-05T14:00:00+00:00", None),  # no fingerprint: counted nowhere
        _row("swav", 0, 0.10, "2026-11-29T00:00:00+00:00", stale),  # named like the preset, another hash: left out
        _row("swav", 1, 0.37, "2026-11-29T16:00:00+00:00", swav),
        _row("swav", 2, 0.39, "2026-11-29T17:00:00+00:00", swav, steps=0),  # untrained rows never count as trained
        _row("cmc", 0, 0.44, "2026-11-29T13:00:00+00:00", _hash("cmc", epochs=4), epochs=4),
        _row("untrained-pinit", 0, 0.33, "2026-12-05T10:00:00+00:00", _hash("simclr", *_PINIT), steps=0),
    ]
    results = tmp_path / "quality.json"
    results.write_text(json.dumps(rows))
    out = tmp_path / "bars"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bars.py"), "--results", str(results), "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=True,
        timeout=300,
    )
    bars = {b["method"]: b for b in json.loads((out / "bars.json").read_text())}
    simsiam_bar = bars["simsiam"]
    assert simsiam in simsiam_bar["recipe_hashes"]
    assert simsiam_bar["runs_by_seed"] == {"0": [0.38, 0.40], "1": [0.35]}
    assert simsiam_bar["knn_by_seed"] == pytest.approx({"0": 0.39, "1": 0.35})
    assert simsiam_bar["knn_mean"] == pytest.approx(0.37)
    assert simsiam_bar["knn_sd"] == pytest.approx(statistics.stdev([0.39, 0.35]))
    assert simsiam_bar["paired_gain_mean"] == pytest.approx((0.03 + 0.01) / 2)  # each seed against its own untrained
    assert simsiam_bar["mean_minus_reference"] == pytest.approx(0.37 - 0.383)
    assert simsiam_bar["seeds_at_reference"] == 1
    assert bars["swav"]["runs_by_seed"] == {"1": [0.37]}  # the stale hash's 0.10 and the untrained row are not counted
    assert bars["cmc-4x"]["knn_by_seed"] == pytest.approx({"0": 0.44})
    assert bars["cmc"]["seeds"] == []  # the four-epoch row is not a one-epoch figure
    table = (out / "bars.md").read_text()
    assert "| simsiam | 4 | one epoch | s0 0.380/0.400 s1 0.350 | 0.370 |" in table
    assert "- torchvision init (the presets): s0 0.360 s1 0.340; mean 0.350, sd 0.014" in table  # fp32 counts too
    assert "- pytorch init (lightly's): s0 0.330; mean 0.330\n" in table


def test_bench_keeps_the_benchmarks_and_notes_hold_the_investigations():
    bench = ROOT / "bench"
    benchmarks = {"_common.py", "_lightly_peer.py", "bars.py", "quality.py", "speed.py", "resume_check.py", "long.py"}
    assert {p.name for p in bench.glob("*.py")} == benchmarks
    assert not (bench / "gpu_jobs").exists() and not (bench / "init_turn.py").exists()
    notes = bench / "notes"
    readme = (notes / "README.md").read_text()
    for item in [*notes.glob("*.py"), *notes.glob("gpu_jobs/*")]:
        assert item.relative_to(notes).as_posix() in readme, item
    assert "bench/notes/gpu_jobs/simsiam-lightly.txt" in (bench / "gpu_check.sh").read_text()
    assert (bench / "notes" / "gpu_jobs" / "simsiam-lightly.txt").exists()
    rows = json.loads((bench / "results" / "quality.json").read_text())
    assert all("recipe_hash" in r for r in rows)  # a hash, or null with a note saying why
    assert all(r["recipe_hash"] or r.get("recipe_hash_note") for r in rows)
