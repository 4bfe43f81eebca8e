"""The report's HTML page: one file with its style inline, the figures as PNGs beside it, no network access."""

from __future__ import annotations

import html
import json
from typing import Any

from clcli.report.curves import Figure

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d2430; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d8dde6; padding-bottom: 0.2em; margin-top: 1.6em; }
.sub { color: #5a6473; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
td, th { border: 1px solid #d8dde6; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e4e7ec; }
figcaption { color: #5a6473; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #8a5a00; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        text = json.dumps(v)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(v)


def table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows) + "</table>"


def eval_tables(results: dict[str, dict[str, Any]]) -> str:
    """One table per ``eval/*.json`` file: its scalar results first, then what it evaluated."""
    if not results:
        return '<p class="note">No evaluation results yet: run <code>clcli eval knn --run RUN</code> (or linear).</p>'
    parts = []
    for name, result in sorted(results.items()):
        scores = [(k, v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        other = [(k, v) for k, v in result.items() if (k, v) not in scores and k != "output"]
        parts.append(f"<h3>{_e(name)}</h3>" + table(scores + other))
    return "".join(parts)


def figure_html(fig: Figure) -> str:
    return (
        f'<figure><img src="{_e(fig.file)}" alt="{_e(fig.title)}">'
        f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)}</figcaption></figure>"
    )


def render(
    *,
    recipe_name: str,
    facts: list[tuple[str, Any]],
    training: list[Figure],
    results: dict[str, dict[str, Any]],
    samples: list[Figure],
    notes: list[str],
    recipe_yaml: str,
) -> str:
    """The whole page as text."""
    body = [
        f'<h1 id="recipe">{_e(recipe_name)}</h1>',
        f'<p class="sub">clcli run report: {_e(dict(facts).get("method", ""))}</p>',
        "<h2>Run</h2>",
        table(facts),
        "<h2>Training</h2>",
        *(figure_html(f) for f in training),
        "<h2>Evaluation</h2>",
        eval_tables(results),
        "<h2>The encoder on a sample</h2>",
        *(figure_html(f) for f in samples),
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
        "<h2>Recipe</h2>",
        f"<details><summary>resolved recipe (recipe.yaml)</summary><pre>{_e(recipe_yaml)}</pre></details>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(recipe_name)}: clcli report</title>"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>\n'
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
