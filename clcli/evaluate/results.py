"""The one place evaluation results are written: a JSON file per protocol (kNN, linear probe, zero-shot)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def timestamp() -> str:
    """The time of an evaluation, as results record it (UTC, ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_result(result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Write ``result`` as indented JSON to ``out`` (folders created) and record the path under ``output``.

    With ``out`` None nothing is written.  Returns ``result``.
    """
    if out is None:
        return result
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["output"] = str(out)
    return result
