"""Whether the user allows clcli to load Python code that a recipe names (``python:`` hooks).

A recipe or a run folder may come from elsewhere.  Importing a module it names runs that module's
code, so a hook that needs an import does so only when the user allows it: ``--allow-code`` on the
commands that load recipes (inside :func:`allowing_code`), or the environment variable
``CLCLI_ALLOW_CODE=1``.  Otherwise :func:`require_code_permission` raises a
:class:`~clcli.errors.CodeNotAllowedError` naming the module.  (TorchScript files are gated the same
way by ``--trust-torchscript``.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from clcli.errors import CodeNotAllowedError

__all__ = ["ENV_VAR", "allowing_code", "code_allowed", "require_code_permission"]

ENV_VAR = "CLCLI_ALLOW_CODE"
_allowed = False


def code_allowed() -> bool:
    """True inside :func:`allowing_code` or when ``CLCLI_ALLOW_CODE`` is 1 / true / yes."""
    return _allowed or os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def allowing_code(allow: bool = True) -> Iterator[None]:
    """Within the block, code named by recipes may be loaded when ``allow`` (the ``--allow-code`` flag)."""
    global _allowed
    previous = _allowed
    _allowed = previous or allow
    try:
        yield
    finally:
        _allowed = previous


def require_code_permission(what: str, module: str) -> None:
    """Raise :class:`CodeNotAllowedError` unless loading code is allowed; ``what`` names the hook."""
    if code_allowed():
        return
    raise CodeNotAllowedError(
        f"{what} asks to import the Python module {module!r}, which runs its code; clcli loads code named "
        f"by a recipe only when you allow it: add --allow-code (or set {ENV_VAR}=1) if you trust this recipe"
    )
