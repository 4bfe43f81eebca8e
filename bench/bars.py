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

Which rows measure the current preset is written down below (``METHODS``), with the reason, since a
row's name and overrides do not say which version of a preset it ran: a preset that changed after a
row was measured excludes that row through ``since``.  Rows measured on another device or in fp32
(a CPU without bf16) count as further seeds of the same recipe.

    python bench/bars.py                      # bench/results/bars.{json,md}
    python bench/bars.py --results other.json --out /tmp/bars
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import LIGHTLY_SIMSIAM

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Rows:
    """Rows of quality.json: a row name, its overrides, and measured no earlier than ``since``."""

    method: str
    overrides: tuple[str, ...] = ()
    since: str = ""  # ISO time of the preset's last change that alters a one-epoch run
    epochs: float = 1


@dataclass(frozen=True)
class Bar:
    issue: int
    rows: tuple[Rows, ...]
    baseline: tuple[Rows, ...]
    untrained_bar: float  # the untrained figure the issue names
    reference: float | None = None  # a public implementation's figure at the same budget
    reference_name: str = ""
    why: str = ""


def _cifar_rows(name: str, since: str = "", overrides: tuple[str, ...] = ()) -> tuple[Rows, ...]:
    """The CPU row, the session-11 H200 rows and the gpu_check.sh rows of one recipe."""
    return tuple(Rows(f"{name}{suffix}", overrides, since) for suffix in ("", "-h200", "-gpu"))


_PINIT = ("model.backbone.init=pytorch",)
UNTRAINED = _cifar_rows("untrained")
UNTRAINED_PINIT = _cifar_rows("untrained-pinit", overrides=_PINIT)
# the untrained ResNet-18 (CIFAR stem) by seed, as the presets build it and with PyTorch's layer
# defaults (model.backbone.init=pytorch, as lightly's benchmark ResNet)
BASELINES: dict[str, tuple[Rows, ...]] = {
    "torchvision init (the presets)": UNTRAINED,
    "pytorch init (lightly's)": UNTRAINED_PINIT,
}

METHODS: dict[str, Bar] = {
    "simclr": Bar(2, _cifar_rows("simclr"), UNTRAINED, 0.365),
    "byol": Bar(
        4,
        # the preset runs each view in its own pass since 9a367f8 (the code default); 'byol' rows
        # before it ran both views in one pass, 'byol-perview' measured the current preset
        (Rows("byol-perview", ("method.view_passes=separate",)), *_cifar_rows("byol", "2026-11-29T11:48:54")),
        UNTRAINED,
        0.365,
        0.381,
        "lightly",
    ),
    "simsiam": Bar(4, _cifar_rows("simsiam"), UNTRAINED, 0.365, 0.383, "lightly"),
    "swav": Bar(
        4,
        # one epoch without the queue since 2d2151b; 'swav-noqueue' measured that before the change
        (Rows("swav-noqueue", ("method.queue_length=0",)), *_cifar_rows("swav", "2026-11-29T05:50:38")),
        UNTRAINED,
        0.365,
        0.388,
        "lightly",
    ),
    "dino": Bar(
        4,
        # batch norm in the head since 6399d61; 'dino-headbn' measured that before the change
        (Rows("dino-headbn", ("method.head_norm=bn",)), *_cifar_rows("dino", "2026-11-29T04:29:08")),
        UNTRAINED,
        0.365,
        0.339,
        "lightly",
    ),
    "deepcluster": Bar(4, _cifar_rows("deepcluster"), _cifar_rows("untrained-sobel"), 0.3455),
    "dino-vit": Bar(
        4,
        (Rows("dino-vit", epochs=4),),  # starts slowly: the issue's four-times budget
        (Rows("untrained-vit"),),
        0.2964,
        why="ViT, four epochs",
    ),
    "cpc": Bar(
        5,
        # rows 1-5 below since dc90a3a; 'cpc-k1' measured that before the change
        (Rows("cpc-k1", ("method.min_step=1",)), *_cifar_rows("cpc", "2026-11-29T12:30:29")),
        _cifar_rows("untrained-cpc"),
        0.359,
    ),
    "cmc": Bar(5, _cifar_rows("cmc"), _cifar_rows("untrained-cmc"), 0.373),
    "cmc-4x": Bar(
        5,
        (Rows("cmc", epochs=4),),
        _cifar_rows("untrained-cmc"),
        0.373,
        why="four epochs (owner's decision pending)",
    ),
}


# Not presets: the same bars for settings under test (bench/gpu_jobs/simsiam-lightly.txt), each paired
# with the untrained backbone of its own initialisation.
VARIANTS: dict[str, Bar] = {
    "simsiam, pytorch init": Bar(
        4,
        (Rows("simsiam-pi-gpu", _PINIT),),
        UNTRAINED_PINIT,
        0.365,
        0.383,
        "lightly",
        "one epoch, not a preset",
    ),
    "simsiam, lightly's settings and init": Bar(
        4,
        (Rows("simsiam-li-gpu", LIGHTLY_SIMSIAM + _PINIT),),
        UNTRAINED_PINIT,
        0.365,
        0.383,
        "lightly",
        "one epoch, not a preset",
    ),
    "simsiam, lightly's settings": Bar(
        4, (Rows("simsiam-lb-gpu", LIGHTLY_SIMSIAM),), UNTRAINED, 0.365, 0.383, "lightly", "one epoch, not a preset"
    ),
    "swav, pytorch init": Bar(
        4,
        (Rows("swav-pi-gpu", _PINIT),),
        UNTRAINED_PINIT,
        0.365,
        0.388,
        "lightly",
        "one epoch, not a preset",
    ),
}


def select(rows: list[dict[str, Any]], wanted: tuple[Rows, ...]) -> dict[int, list[float]]:
    """kNN top-1 of the matching rows by seed, in the order measured (a seed run on two devices has two)."""
    found: list[tuple[str, int, float]] = []
    for r in rows:
        for w in wanted:
            if (
                r["method"] == w.method
                and float(r["epochs"]) == float(w.epochs)
                and tuple(r.get("overrides") or ()) == w.overrides
                and r.get("when", "") >= w.since
            ):
                found.append((r.get("when", ""), int(r["seed"]), float(r["knn_top1"])))
    by_seed: dict[int, list[float]] = {}
    for _, seed, value in sorted(found):
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
        runs = select(rows, bar.rows)
        knn = per_seed(runs)
        base = per_seed(select(rows, bar.baseline))
        gains = [knn[s] - base[s] for s in knn if s in base]
        mean, sd = _mean_sd(list(knn.values()))
        gain, gain_sd = _mean_sd(gains)
        out.append(
            {
                "method": name,
                "issue": bar.issue,
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
    baselines = {label: select(rows, wanted) for label, wanted in BASELINES.items()}
    (args.out / "bars.md").write_text(markdown(summary, baselines))
    print((args.out / "bars.md").read_text(), end="")


if __name__ == "__main__":
    main()
