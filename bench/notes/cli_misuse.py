"""Fault injection against the command line: ~50 ordinary misuses, each run as its own ``clcli`` process.

Every case is something a user can do (a wrong path, an unwritable output, a damaged run folder, a bad
option value).  A case ends *clean* when the process exits with code 2 and stderr is one ``error:`` line
(or Typer's usage box) without a Python traceback (*clean-multiline*: exit 2, no traceback, a message of
several lines); *traceback* when stderr holds one; *accepted* when it exits 0; *timeout* when it still runs
after 150 s (a misuse accepted as a full training run, or a hang); *exit-N* for any other exit.
Run from the repository root::

    PYTHONPATH=$PWD python bench/notes/cli_misuse.py [--json results.json]

It trains one tiny SimCLR run (3 steps on the embedded digits) to damage copies of.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TINY = [
    "model.backbone.name=convnet",
    "model.backbone.width=8",
    "views.groups.0.size=16",
    "views.eval_size=16",
    "method.projector=[32, 16]",
    "trainer.batch_size=32",
    "trainer.steps=3",
    "trainer.precision=fp32",
    "trainer.threads=1",
    "data.limit=128",
]


def sets(*extra: str) -> list[str]:
    return [a for item in (*TINY, *extra) for a in ("--set", item)]


CWD: Path | None = None  # the scratch folder: a case such as --out '' writes into the working folder


def clcli(*args: str, env: dict[str, str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    code = "import sys; from clcli.cli import main; sys.argv[0] = 'clcli'; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=CWD,
        env={**os.environ, **(env or {})},
    )


def classify(proc: subprocess.CompletedProcess) -> str:
    if "Traceback (most recent call last)" in proc.stderr or "Traceback" in proc.stdout:
        return "traceback"
    if proc.returncode == 0:
        return "accepted"
    if proc.returncode == 2:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        if lines and (lines[0].startswith("error:") and len(lines) <= 2 or lines[0].startswith("Usage:")):
            return "clean"
        return "clean-multiline"
    return f"exit-{proc.returncode}"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    global CWD
    tmp = Path(tempfile.mkdtemp(prefix="clcli-misuse-"))
    CWD = tmp / "cwd"
    CWD.mkdir()
    run = tmp / "run"
    proc = clcli("pretrain", "--recipe", "simclr", "--out", str(run), "--no-progress", *sets())
    if proc.returncode != 0:
        sys.exit(f"could not train the tiny run:\n{proc.stderr}")
    afile = tmp / "a-file.txt"
    afile.write_text("not a folder\n")
    adir = tmp / "a-dir"
    adir.mkdir()
    (tmp / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    (tmp / "empty.yaml").write_text("")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")

    truncated = copy_run(run, tmp / "run-trunc-state")
    state = truncated / "checkpoints" / "step-00000003" / "trainer.json"
    state.write_text(state.read_text()[:100])
    bad_model = copy_run(run, tmp / "run-bad-model")
    (bad_model / "checkpoints" / "step-00000003" / "model.safetensors").write_bytes(b"garbage")
    bad_optim = copy_run(run, tmp / "run-bad-optim")
    (bad_optim / "checkpoints" / "step-00000003" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    bad_recipe = copy_run(run, tmp / "run-bad-recipe")
    (bad_recipe / "recipe.yaml").write_text("method: [unclosed\n")
    no_ckpt = copy_run(run, tmp / "run-no-ckpt")
    shutil.rmtree(no_ckpt / "checkpoints")
    bad_latest = copy_run(run, tmp / "run-bad-latest")
    (bad_latest / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")
    bad_prov = copy_run(run, tmp / "run-bad-prov")
    (bad_prov / "provenance.json").write_text("{")

    clip = tmp / "clip"
    clip_sets = [
        a
        for item in (
            *TINY[:4],
            "method.embed_dim=32",
            "method.text_width=32",
            "method.text_layers=1",
            "method.text_heads=2",
            "method.vocab_size=300",
            "trainer.steps=2",
            "trainer.batch_size=32",
            "trainer.precision=fp32",
            "data.limit=64",
        )
        for a in ("--set", item)
    ]
    proc = clcli("pretrain", "--recipe", "clip", "--out", str(clip), "--no-progress", *clip_sets)
    if proc.returncode != 0:
        sys.exit(f"could not train the tiny CLIP run:\n{proc.stderr}")
    images = tmp / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(images / f"{i}.png")
    zs = ["zeroshot", "--run", str(clip), "--labels", "cat,dog"]
    pre = ["pretrain", "--recipe", "simclr", "--no-progress"]
    knn = ["eval", "knn", "--run", str(run)]
    cases: dict[str, list[str]] = {
        # pretrain: outputs
        "pretrain --out /proc/x": [*pre, "--out", "/proc/x", *sets()],
        "pretrain --out FILE": [*pre, "--out", str(afile), *sets()],
        "pretrain --out FILE/sub": [*pre, "--out", str(afile / "sub"), *sets()],
        "pretrain --out existing run": [*pre, "--out", str(run), *sets()],
        "pretrain --out ''": [*pre, "--out", "", *sets("trainer.steps=1")],
        # pretrain: inputs
        "pretrain --data ''": [*pre, "--data", "", "--out", str(tmp / "o1"), *sets()],
        "pretrain --data missing": [*pre, "--data", str(tmp / "nope"), "--out", str(tmp / "o2"), *sets()],
        "pretrain --data FILE.txt": [*pre, "--data", str(afile), "--out", str(tmp / "o3"), *sets()],
        "pretrain --data empty dir": [*pre, "--data", str(adir), "--out", str(tmp / "o4"), *sets()],
        "pretrain --recipe missing": ["pretrain", "--recipe", "no-such-recipe", "--out", str(tmp / "o5")],
        "pretrain --recipe DIR": ["pretrain", "--recipe", str(adir), "--out", str(tmp / "o6")],
        "pretrain --recipe latin-1": ["pretrain", "--recipe", str(tmp / "latin1.yaml"), "--out", str(tmp / "o7")],
        "pretrain --recipe empty": ["pretrain", "--recipe", str(tmp / "empty.yaml"), "--out", str(tmp / "o8"), *sets()],
        "pretrain --recipe list": ["pretrain", "--recipe", str(tmp / "list.yaml"), "--out", str(tmp / "o9")],
        "pretrain no recipe": ["pretrain", "--out", str(tmp / "o10")],
        "pretrain --set a..b=1": [*pre, "--out", str(tmp / "o11"), "--set", "trainer..epochs=1"],
        "pretrain --set .a=1": [*pre, "--out", str(tmp / "o12"), "--set", ".trainer.epochs=1"],
        "pretrain --set noequals": [*pre, "--out", str(tmp / "o13"), "--set", "trainer.epochs"],
        "pretrain --set unknown": [*pre, "--out", str(tmp / "o14"), "--set", "trainer.nope=1"],
        "pretrain --set epochs=abc": [*pre, "--out", str(tmp / "o15"), "--set", "trainer.epochs=abc"],
        "pretrain --set groups.9.size": [*pre, "--out", str(tmp / "o16"), "--set", "views.groups.9.size=8"],
        "pretrain --set yaml error": [*pre, "--out", str(tmp / "o17"), "--set", "method.projector=[1,"],
        # pretrain: resume a damaged run
        "resume missing run": ["pretrain", "--resume", "--out", str(tmp / "nope-run")],
        "resume truncated trainer.json": ["pretrain", "--resume", "--out", str(truncated), "--no-progress"],
        "resume bad model.safetensors": ["pretrain", "--resume", "--out", str(bad_model), "--no-progress"],
        "resume bad optimizer.safetensors": ["pretrain", "--resume", "--out", str(bad_optim), "--no-progress"],
        "resume bad recipe.yaml": ["pretrain", "--resume", "--out", str(bad_recipe), "--no-progress"],
        "resume bad latest pointer": ["pretrain", "--resume", "--out", str(bad_latest), "--no-progress"],
        "resume bad provenance.json": ["pretrain", "--resume", "--out", str(bad_prov), "--no-progress"],
        # eval
        "knn --run missing": ["eval", "knn", "--run", str(tmp / "nope")],
        "knn --run FILE": ["eval", "knn", "--run", str(afile)],
        "knn --output /proc/x": [*knn, "--output", "/proc/x/knn.json"],
        "knn --output DIR": [*knn, "--output", str(adir)],
        "knn --output FILE/sub": [*knn, "--output", str(afile / "knn.json")],
        "knn --test-limit -5": [*knn, "--test-limit", "-5"],
        "knn --train-limit 0": [*knn, "--train-limit", "0"],
        "knn --k 0": [*knn, "--k", "0"],
        "knn --features foo": [*knn, "--features", "foo"],
        "knn --data ''": [*knn, "--data", ""],
        "knn --checkpoint missing": [*knn, "--checkpoint", str(tmp / "nope")],
        "knn truncated trainer.json": ["eval", "knn", "--run", str(truncated)],
        "knn bad model.safetensors": ["eval", "knn", "--run", str(bad_model)],
        "knn run without checkpoint": ["eval", "knn", "--run", str(no_ckpt)],
        "knn --checkpoint FILE (no run)": ["eval", "knn", "--checkpoint", str(afile), "--data", "embedded:digits"],
        "linear --output /proc/x": ["eval", "linear", "--run", str(run), "--output", "/proc/x/l.json"],
        "linear --test-limit -5": ["eval", "linear", "--run", str(run), "--test-limit", "-5"],
        # export
        "export --out /proc/x": ["export", "--run", str(run), "--out", "/proc/x/e.safetensors"],
        "export --out DIR": ["export", "--run", str(run), "--out", str(adir)],
        "export --out FILE/sub": ["export", "--run", str(run), "--out", str(afile / "e.safetensors")],
        "export --format onnx": ["export", "--run", str(run), "--out", str(tmp / "e.onnx"), "--format", "onnx"],
        "export --run missing": ["export", "--run", str(tmp / "nope"), "--out", str(tmp / "e2.safetensors")],
        "export truncated trainer.json": ["export", "--run", str(truncated), "--out", str(tmp / "e3.safetensors")],
        "export --checkpoint FILE": [
            "export",
            "--run",
            str(run),
            "--checkpoint",
            str(afile),
            "--out",
            str(tmp / "e4.safetensors"),
        ],  # fmt: skip
        # zeroshot
        "zeroshot non-CLIP run": ["zeroshot", "--run", str(run), "--labels", "a,b", "--images", str(adir)],
        "zeroshot --output /proc/x": [*zs, "--images", str(images), "--output", "/proc/x/z.json"],
        "zeroshot --output DIR": [*zs, "--images", str(images), "--output", str(adir)],
        "zeroshot --output FILE/sub": [*zs, "--images", str(images), "--output", str(afile / "z.json")],
        "zeroshot CLIP --images missing": [*zs, "--images", str(tmp / "nope")],
        "zeroshot CLIP --images empty dir": [*zs, "--images", str(adir)],
        "zeroshot --labels ''": ["zeroshot", "--run", str(clip), "--labels", "", "--images", str(images)],
        "zeroshot --data ''": [*zs, "--data", ""],
        "pretrain python: hook": [
            "pretrain",
            "--recipe",
            "clip-lit",
            "--out",
            str(tmp / "o18"),
            "--no-progress",
            "--set",
            "method.text_encoder=python:json",
            *[a for x in (*TINY[:4], "trainer.steps=1") for a in ("--set", x)],
        ],  # fmt: skip
        "zeroshot --images missing": ["zeroshot", "--run", str(run), "--labels", "a,b", "--images", str(tmp / "x")],
        "zeroshot --labels-file missing": ["zeroshot", "--run", str(run), "--labels-file", str(tmp / "x.txt")],
        "zeroshot no model": ["zeroshot", "--labels", "a,b"],
        # recipes
        "recipes show missing": ["recipes", "show", "no-such-recipe"],
        "recipes show --set a..b": ["recipes", "show", "simclr", "--set", "a..b=1"],
    }

    def one(item: tuple[str, list[str]]) -> tuple[str, str, int, str]:
        name, argv = item
        try:
            proc = clcli(*argv)
        except subprocess.TimeoutExpired:
            return name, "timeout", -1, ""  # still running: accepted (a training run) or hung
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return name, classify(proc), proc.returncode, (lines[-1] if lines else "")[:160]

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for name, kind, rc, last in pool.map(one, cases.items()):
            print(f"{kind:>15}  rc={rc:<3} {name:<34} {last}", flush=True)
            rows.append((name, kind, rc, last))
    leftovers = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if ".tmp" in p.name)
    counts: dict[str, int] = {}
    for _, kind, _, _ in rows:
        counts[kind] = counts.get(kind, 0) + 1
    print(f"\n{len(rows)} misuses: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"temporary files left behind: {leftovers or 'none'}")
    if args.json:
        args.json.write_text(
            json.dumps({"counts": counts, "cases": rows, "temporary_left": leftovers}, indent=2) + "\n"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
