"""The one place evaluation results are written: a JSON file per protocol (kNN, linear probe, zero-shot)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clcli.fsio import atomic_output, check_output_file


def timestamp() -> str:
    """The time of an evaluation, as results record it (UTC, ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_output(out: Path | None) -> None:
    """Refuse, before an evaluation starts, a result path that cannot be written (a folder, under a file, ...)."""
    if out is not None:
        check_output_file(out, "the result file")


def write_result(result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Write ``result`` as indented JSON to ``out`` (folders created) and record the path under ``output``.

    The file is replaced only once complete (no partial file on a failure).  With ``out`` None
    nothing is written.  Returns ``result``.
    """
    if out is None:
        return result
    out = Path(out)
    with atomic_output(out, "the result file") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    result["output"] = str(out)
    return result
