"""The issues' quality bars against the measured rows, over seeds.

One kNN figure after one CIFAR-10 epoch moves by a few points from one seed to the next (the seed
sets the initial weights, the data order and the crops), as much as the gaps the bars ask about.
This script gathers, for each method with a bar, the rows of ``bench/results/quality.json`` that
measure its current preset, and reports per seed and over seeds:

- ``knn``: kNN top-1 by seed, their mean and standard deviation;
- ``paired``: the gain over the untrained backbone of the same seed (the seed fixes the initial
  weights, and the untrained row of that seed scores exactly those weights), mean and sd over the
  seeds that have both;
- the bars: the untrained figure the issue names, and the public reference it names, if any.

Which rows measure the current preset is decided by their ``recipe_hash`` (``_common.recipe_hash``):
each bar's preset (recipe and overrides) is resolved as it is today at the quality budget, and the
trained rows with its hash count, whatever their name, date or device; the untrained rows with the
hash of the bar's baseline recipe are its untrained backbone.  A row of an older version of the
preset has another hash and is left out; a row without a hash (``recipe_hash: null``, see
``bench/notes/backfill_recipe_hash.py``) counts nowhere.  The budget's bf16 and its fp32 fallback
(a CPU without bf16 arithmetic) are both accepted, so fp32 rows count as further seeds.

    python bench/bars.py                      # bench/results/bars.{json,md}
    python bench/bars.py --results other.json --out /tmp/bars
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import LIGHTLY_SIMSIAM, preset_hashes

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Preset:
    """A recipe with overrides at the quality budget (``epochs`` may differ): the rows it selects
    are those whose recipe_hash is its hash today."""

    recipe: str
    overrides: tuple[str, ...] = ()
    epochs: float = 1

    def hashes(self) -> frozenset[str]:
        return _hashes(self)


@functools.cache
def _hashes(preset: Preset) -> frozenset[str]:
    return frozenset(preset_hashes(preset.recipe, preset.overrides, preset.epochs))


@dataclass(frozen=True)
class Bar:
    issue: int
    preset: Preset
    baseline: Preset  # whose untrained backbone each seed is paired with
    untrained_bar: float  # the untrained figure the issue names
    reference: float | None = None  # a public implementation's figure at the same budget
    reference_name: str = ""
    why: str = ""


_PINIT = ("model.backbone.init=pytorch",)
UNTRAINED = Preset("simclr")
UNTRAINED_PINIT = Preset("simclr", _PINIT)
# the untrained ResNet-18 (CIFAR stem) by seed, as the presets build it and with PyTorch's layer
# defaults (model.backbone.init=pytorch, as lightly's benchmark ResNet)
BASELINES: dict[str, Preset] = {
    "torchvision init (the presets)": UNTRAINED,
    "pytorch init (lightly's)": UNTRAINED_PINIT,
}

METHODS: dict[str, Bar] = {
    "simclr": Bar(2, Preset("simclr"), UNTRAINED, 0.365),
    "byol": Bar(4, Preset("byol"), UNTRAINED, 0.365, 0.381, "lightly"),
    "simsiam": Bar(4, Preset("simsiam"), UNTRAINED, 0.365, 0.383, "lightly"),
    "swav": Bar(4, Preset("swav"), UNTRAINED, 0.365, 0.388, "lightly"),
    "dino": Bar(4, Preset("dino"), UNTRAINED, 0.365, 0.339, "lightly"),
    "deepcluster": Bar(4, Preset("deepcluster"), Preset("deepcluster"), 0.3455),
    "dino-vit": Bar(4, Preset("dino-vit", epochs=4), Preset("dino-vit"), 0.2964, why="ViT, four epochs"),
    "cpc": Bar(5, Preset("cpc"), Preset("cpc"), 0.359),
    "cmc": Bar(5, Preset("cmc"), Preset("cmc"), 0.373),
    "cmc-4x": Bar(5, Preset("cmc", epochs=4), Preset("cmc"), 0.373, why="four epochs (owner's decision pending)"),
}


# Not presets: the same bars for settings under test (bench/notes/gpu_jobs/simsiam-lightly.txt), each
# paired with the untrained backbone of its own initialisation.
_NOT_PRESET = "one epoch, not a preset"
VARIANTS: dict[str, Bar] = {
    "simsiam, pytorch init": Bar(4, Preset("simsiam", _PINIT), UNTRAINED_PINIT, 0.365, 0.383, "lightly", _NOT_PRESET),
    "simsiam, lightly's settings and init": Bar(
        4, Preset("simsiam", LIGHTLY_SIMSIAM + _PINIT), UNTRAINED_PINIT, 0.365, 0.383, "lightly", _NOT_PRESET
    ),
    "simsiam, lightly's settings": Bar(
        4, Preset("simsiam", LIGHTLY_SIMSIAM), UNTRAINED, 0.365, 0.383, "lightly", _NOT_PRESET
    ),
    "swav, pytorch init": Bar(4, Preset("swav", _PINIT), UNTRAINED_PINIT, 0.365, 0.388, "lightly", _NOT_PRESET),
}


def select(rows: list[dict[str, Any]], preset: Preset, trained: bool = True) -> dict[int, list[float]]:
    """kNN top-1 by seed of the rows with the preset's hash, trained or untrained (``steps`` 0), in the
    order measured (a seed run on two devices has two)."""
    wanted = preset.hashes()
    found = sorted(
        (r.get("when", ""), int(r["seed"]), float(r["knn_top1"]))
        for r in rows
        if r.get("recipe_hash") in wanted and (int(r.get("steps", 0)) > 0) == trained
    )
    by_seed: dict[int, list[float]] = {}
    for _, seed, value in found:
        by_seed.setdefault(seed, []).append(value)
    return dict(sorted(by_seed.items()))


def per_seed(values: dict[int, list[float]]) -> dict[int, float]:
    """One figure per seed: the mean of its runs (runs of one seed are not independent samples)."""
    return {s: statistics.fmean(v) for s, v in values.items()}


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, bar in {**METHODS, **VARIANTS}.items():
        runs = select(rows, bar.preset)
        knn = per_seed(runs)
        base = per_seed(select(rows, bar.baseline, trained=False))
        gains = [knn[s] - base[s] for s in knn if s in base]
        mean, sd = _mean_sd(list(knn.values()))
        gain, gain_sd = _mean_sd(gains)
        out.append(
            {
                "method": name,
                "issue": bar.issue,
                "recipe": bar.preset.recipe,
                "overrides": list(bar.preset.overrides),
                "recipe_hashes": sorted(bar.preset.hashes()),
                "budget": bar.why or "one epoch",
                "seeds": list(knn),
                "knn_by_seed": knn,
                "runs_by_seed": runs,
                "knn_mean": mean,
                "knn_sd": sd,
                "untrained_by_seed": {s: base[s] for s in knn if s in base},
                "paired_gain_mean": gain,
                "paired_gain_sd": gain_sd,
                "paired_seeds": len(gains),
                "untrained_bar": bar.untrained_bar,
                "above_untrained_bar": None if mean is None else mean > bar.untrained_bar,
                "reference": bar.reference,
                "reference_name": bar.reference_name,
                "mean_minus_reference": None if mean is None or bar.reference is None else mean - bar.reference,
                "seeds_at_reference": None if bar.reference is None else sum(v >= bar.reference for v in knn.values()),
            }
        )
    return out


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _seeds(runs: dict[int, list[float]]) -> str:
    return " ".join(f"s{k} " + "/".join(f"{v:.3f}" for v in vs) for k, vs in runs.items())


def markdown(summary: list[dict[str, Any]], baselines: dict[str, dict[int, list[float]]]) -> str:
    lines = [
        "| method | issue | budget | kNN by seed | mean | sd | gain over same-seed untrained (n) | "
        "untrained bar | reference | mean - reference | seeds at reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        seeds = _seeds(s["runs_by_seed"])
        gain = ""
        if s["paired_gain_mean"] is not None:
            gain = _f(s["paired_gain_mean"], True)
            if s["paired_gain_sd"] is not None:
                gain += f" ± {s['paired_gain_sd']:.3f}"
            gain += f" ({s['paired_seeds']})"
        ref = f"{s['reference']:.3f} {s['reference_name']}" if s["reference"] is not None else ""
        at_ref = f"{s['seeds_at_reference']} of {len(s['seeds'])}" if s["reference"] is not None and s["seeds"] else ""
        lines.append(
            f"| {s['method']} | {s['issue']} | {s['budget']} | {seeds} | {_f(s['knn_mean'])} | {_f(s['knn_sd'])} | "
            f"{gain} | {s['untrained_bar']:.3f} | {ref} | {_f(s['mean_minus_reference'], True)} | {at_ref} |"
        )
    lines += ["", "Untrained ResNet-18 (CIFAR stem) by seed:", ""]
    for label, runs in baselines.items():
        mean, sd = _mean_sd(list(per_seed(runs).values()))
        stats = "" if mean is None else f"; mean {_f(mean)}" + ("" if sd is None else f", sd {_f(sd)}")
        lines.append(f"- {label}: {_seeds(runs) or 'not measured'}{stats}")
    lines += [
        "",
        "A seed run more than once (two devices) shows each run and counts as their mean. The gain column",
        "pairs each seed with the untrained row of the same seed (the same initial weights).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for bars.json and bars.md")
    args = p.parse_args()
    rows = json.loads(args.results.read_text())
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bars.json").write_text(json.dumps(summary, indent=2) + "\n")
    baselines = {label: select(rows, preset, trained=False) for label, preset in BASELINES.items()}
    (args.out / "bars.md").write_text(markdown(summary, baselines))
    print((args.out / "bars.md").read_text(), end="")


if __name__ == "__main__":
    main()
