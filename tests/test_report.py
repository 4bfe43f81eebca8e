"""``clcli report``: the page and its PNGs, checked as files and in a real headless browser."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clcli.cli import app
from clcli.evaluate.protocols import knn_eval
from clcli.report.samples import nearest
from clcli.train import pretrain
from tests.helpers import tiny_recipe

pytest.importorskip("matplotlib", reason="clcli report needs matplotlib (pip install 'clcli[report]')")
runner = CliRunner()
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny DINO ViT run with online kNN and a kNN result, and its report (the CLI's default folder)."""
    run = tmp_path_factory.mktemp("report") / "run"
    pretrain(tiny_recipe("dino-vit", "trainer.online_knn_every=0.5", "trainer.steps=8"), run)
    knn_eval(run, train_limit=200, test_limit=100, output=run / "eval" / "knn.json", show_progress=False)
    result = runner.invoke(app, ["report", "--run", str(run), "--sample", "80", "--queries", "4"])
    assert result.exit_code == 0, result.output
    return run, run / "report" / "index.html"


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_writes_a_page_that_references_every_png(vit_report: tuple[Path, Path]) -> None:
    run, index = vit_report
    page = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert sorted(_images(page)) == pngs  # every PNG is on the page, and every image on the page exists
    for name in ("loss.png", "online.png", "health.png", "schedule.png", "embedding_map.png", "neighbours.png"):
        assert name in pngs
    assert "attention.png" in pngs  # a ViT backbone: the class token's attention
    assert '<h1 id="recipe">dino-vit</h1>' in page
    assert "<h3>knn</h3><table><tr><th>top1</th><td>0.1</td>" in page  # the result in RUN/eval/knn.json
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained: nothing from the network


def test_report_page_loads_every_image_in_a_headless_browser(vit_report: tuple[Path, Path]) -> None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser found (apt-get install chromium): the page was not opened")
    _, index = vit_report
    # a copy of the page that writes, once loaded, how many of its images decoded (naturalWidth > 0)
    probe = index.with_name("probe.html")
    check = (
        "<script>window.addEventListener('load', () => { const i = [...document.images];"
        " const p = document.createElement('p'); p.id = 'probe';"
        " p.textContent = 'loaded ' + i.filter(x => x.complete && x.naturalWidth > 0).length + ' of ' + i.length;"
        " document.body.appendChild(p); });</script>"
    )
    probe.write_text(index.read_text().replace("</body>", check + "</body>"))
    try:
        out = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
             probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        probe.unlink()
    assert out.returncode == 0, out.stderr[-2000:]
    n = len(_images(index.read_text()))
    assert f'<p id="probe">loaded {n} of {n}</p>' in out.stdout, out.stdout[-2000:]
    assert re.search(r'<h1 id="recipe">dino-vit</h1>', out.stdout)


def test_report_without_a_sample_and_with_unlabelled_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(tiny_recipe("simclr", "trainer.steps=2"), run)
    result = runner.invoke(app, ["report", "--run", str(run), "--sample", "0", "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["health.png", "loss.png", "schedule.png"]
    assert not (run / "report").exists()
    folder = tmp_path / "images"
    folder.mkdir()  # a folder of images without class sub-folders: no labels
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    result = runner.invoke(app, ["report", "--run", str(run), "--data", str(folder)])
    assert result.exit_code == 2
    assert "no labelled split" in result.output and "Traceback" not in result.output


def test_report_refuses_without_matplotlib_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name, *a))
    result = runner.invoke(app, ["report", "--run", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install 'clcli[report]'" in result.output


def test_report_of_a_folder_that_is_no_run_is_one_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", "--run", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_nearest_neighbours_are_the_most_similar_other_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    got = nearest(x, 3)
    z = torch.nn.functional.normalize(x, dim=1)
    for i in range(40):
        sims = [(float(z[i] @ z[j]), j) for j in range(40) if j != i]
        assert got[i].tolist() == [j for _, j in sorted(sims, reverse=True)[:3]]
