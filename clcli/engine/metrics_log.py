"""A run's metrics file, ``metrics.jsonl``: one JSON object per line, appended by the trainer.

Every line is strict JSON (RFC 8259), which has no numbers for nan and infinity: a non-finite
float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` and :func:`read_records` turns
those strings back into floats (lines written by earlier versions with the bare ``NaN`` token of
Python's ``json`` read as well).

On resume the file is cut back to what it held when the checkpoint was written
(:func:`cut_back`), so after any number of interruptions and resumptions it is one sequence of
increasing steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from clcli.engine.checkpoint import atomic_write_text
from clcli.errors import CheckpointError

# how a non-finite float is written, and read back
_WRITTEN = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _WRITTEN:
        return _WRITTEN[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def metrics_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON, ending in a newline; nan, inf and -inf become the
    strings ``"nan"``, ``"inf"`` and ``"-inf"``."""
    return json.dumps(_encode(record), allow_nan=False) + "\n"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics file, in order, with ``"nan"``/``"inf"``/``"-inf"`` read back as floats.

    A last line cut short (the process was killed while writing it) is left out; any other line
    that does not read is a :class:`~clcli.errors.CheckpointError` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_decode(json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: a write cut short
                break
            raise CheckpointError(f"{path} line {number} is damaged (not valid JSON: {exc})") from None
    return records


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def cut_back(path: Path, step: int, size: int | None) -> int:
    """Cut the metrics file back to what it held when the checkpoint of ``step`` was written.

    ``size`` is the file's length the checkpoint recorded: when the file still starts with a
    complete line there whose step is at most ``step``, it is truncated to that length (every
    record written after the checkpoint goes, a line cut short by a kill included).  Otherwise
    (a checkpoint from an earlier version, or a file changed since) the complete lines whose step
    is at most ``step`` are kept.  Returns how many lines were removed.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if size is not None and 0 <= size <= len(data):
        head = data[:size]
        last = head.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        if size == 0 or (head.endswith(b"\n") and (_step_of(last) or 0) <= step):
            if size < len(data):
                removed = data[size:].count(b"\n") + (not data.endswith(b"\n"))
                os.truncate(path, size)
                return removed
            return 0
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # the last element is what follows the final newline
    stepped = [(ln, _step_of(ln)) for ln in complete if ln.strip()]
    kept = [ln for ln, at in stepped if at is not None and at <= step]
    removed = len(stepped) - len(kept) + bool(tail.strip())
    if removed:
        atomic_write_text(path, b"".join(ln + b"\n" for ln in kept).decode("utf-8", errors="replace"))
    return removed
