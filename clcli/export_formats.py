"""The export formats beside safetensors: TorchScript, ONNX and a Hugging Face style model folder.

Each writer takes the encoder :func:`clcli.export.load_backbone` would give (composite encoders
included: CMC's Lab view encoders, CPC's patch grid) and writes through a temporary that replaces
the target only when complete, so a failure leaves nothing behind.

* TorchScript: ``torch.jit.trace`` at the run's evaluation size; the batch size stays free.  The
  archive carries the metadata as the extra file ``clcli.json``.  PyTorch deprecates TorchScript
  in favour of ``torch.export``; the archive still loads with ``torch.jit.load``.
* ONNX: the ``torch.export``-based exporter (``dynamo=True``, the default since PyTorch 2.9; it
  needs the ``onnx`` and ``onnxscript`` packages, the ``onnx`` extra), one input ``images``
  ``[batch, C, H, W]`` with a dynamic ``batch`` axis and one output ``features`` ``[batch, D]``;
  the metadata is stored in the model's ``metadata_props``.
* ``hf``: a folder with ``config.json``, ``model.safetensors`` (the same file as the safetensors
  export) and a model card ``README.md`` (:mod:`clcli.export_card`).

Every format takes normalised images (``mean`` and ``std`` from the metadata) at ``input_size``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from clcli.errors import ClcliError, FileSystemError
from clcli.fsio import atomic_output, check_output_folder, os_error

__all__ = ["check_model_folder", "example_input", "write_hf", "write_onnx", "write_torchscript"]

# metadata every format carries (the recipe stays in the safetensors file and the hf folder)
_CARRIED = ("format", "kind", "method", "backbone", "mean", "std", "input_size", "feature_dim", "checkpoint")


def example_input(meta: dict[str, str], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded random batch ``[batch, C, S, S]`` of the size and channels the encoder takes."""
    channels = int(json.loads(meta["backbone"]).get("in_channels", 3))
    size = int(meta["input_size"])
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _small_meta(meta: dict[str, str]) -> dict[str, str]:
    return {k: meta[k] for k in _CARRIED if k in meta}


# ------------------------------------------------------------------------------- TorchScript
def write_torchscript(encoder: nn.Module, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Trace ``encoder`` at the metadata's input size and save the archive to ``out``."""
    trace = getattr(torch.jit, "trace", None)
    if trace is None:
        raise ClcliError("this PyTorch has no TorchScript (torch.jit.trace); export with --format onnx instead")
    x = example_input(meta)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notice, and tracer notes on shape checks
            traced = trace(encoder.eval(), (x,), check_trace=False)
    except Exception as exc:  # noqa: BLE001 - a backbone the tracer cannot follow
        raise ClcliError(f"cannot trace the encoder to TorchScript: {_first_line(exc)}") from None
    extra = {"clcli.json": json.dumps(_small_meta(meta))}
    with atomic_output(out, "the export file (--out)", "encoder.pt") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    return {"input_size": int(meta["input_size"])}


# -------------------------------------------------------------------------------------- ONNX
def write_onnx(encoder: nn.Module, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Export ``encoder`` to ONNX at ``out`` with a dynamic batch axis (input ``images``, output ``features``)."""
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ClcliError("--format onnx needs the onnx and onnxscript packages: pip install 'clcli[onnx]'") from None
    x = example_input(meta)
    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                encoder.eval(),
                (x,),
                input_names=["images"],
                output_names=["features"],
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - an operator the exporter does not translate
        raise ClcliError(f"cannot export the encoder to ONNX: {_first_line(exc)}") from None
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise ClcliError("the ONNX exporter returned no program")
    program.model.metadata_props.update({f"clcli.{k}": v for k, v in _small_meta(meta).items()})
    quiet = contextlib.redirect_stdout(io.StringIO())
    with atomic_output(out, "the export file (--out)", "encoder.onnx") as tmp, quiet:
        program.save(str(tmp), external_data=False)
    return {"input_size": int(meta["input_size"]), "opset": _opset(program)}


def _opset(program: Any) -> int | None:
    with contextlib.suppress(Exception):
        return int(program.model.opset_imports.get("", 0)) or None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------- Hugging Face folder
HF_FILES = ("config.json", "model.safetensors", "README.md")


def _is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds a folder written by ``clcli export --format hf`` (its config says so)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == "clcli-encoder-v1"


def check_model_folder(out: Path) -> None:
    """Refuse, before any work, an ``hf`` target that is a file, unwritable, or a folder holding other things.

    An empty folder and an earlier ``clcli export --format hf`` folder are accepted (the latter is
    replaced once the new one is complete).
    """
    out = Path(out)
    check_output_folder(out, "the model folder (--out)")
    if out.is_dir() and any(out.iterdir()) and not _is_model_folder(out):
        raise FileSystemError(
            f"the model folder (--out) {out} already holds other files; give a new or empty folder "
            "(an earlier `clcli export --format hf` folder is replaced)"
        )


def write_hf(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], run_dir: Path) -> dict[str, Any]:
    """Write the ``hf`` folder ``out``: ``config.json``, ``model.safetensors`` and the model card ``README.md``."""
    from clcli.export_card import model_card

    out = Path(out)
    check_model_folder(out)
    config = {
        "library_name": "clcli",
        "model_type": "clcli-encoder",
        "format": meta["format"],
        "kind": meta["kind"],
        "method": meta["method"],
        "backbone": json.loads(meta["backbone"]),
        "feature_dim": int(meta["feature_dim"]),
        "input_size": int(meta["input_size"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
    }
    card = model_card(meta, run_dir)
    with _atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
    return {"files": list(HF_FILES)}


@contextlib.contextmanager
def _atomic_folder(out: Path):  # type: ignore[no-untyped-def]
    """Yield a temporary folder beside ``out``; it replaces ``out`` when the block ends, or is removed on failure."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder of the model folder (--out)", out.parent) from None
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.with_name(f".{out.name}.tmp-{token}")
    old = out.with_name(f".{out.name}.old-{token}")
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            with contextlib.suppress(OSError):
                os.replace(old, out)  # put the earlier folder back
        if isinstance(exc, OSError):
            raise os_error(exc, "write the model folder (--out)", out) from None
        if isinstance(exc, Exception) and not isinstance(exc, ClcliError) and "os error" in str(exc):
            raise FileSystemError(f"cannot write the model folder (--out) {out}: {exc}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
