"""Decoding images into ``uint8`` RGB tensors of shape ``[3, H, W]``.

JPEG, PNG, WebP and GIF are decoded by :func:`torchvision.io.decode_image` (fast: a 32x32 JPEG takes
a few tens of microseconds); anything else (BMP, TIFF, 16-bit PNG, ...) goes through Pillow.

Colour handling, whichever decoder is used:

* grayscale (and 1-bit) images are repeated to three channels;
* an alpha channel (RGBA, LA, palette with transparency) is **dropped**, not composited;
* palette and CMYK images are converted to RGB;
* 16-bit images keep their 8 most significant bits;
* animated images (GIF, WebP) give their first frame;
* the EXIF orientation tag is applied (as Pillow's ``ImageOps.exif_transpose``): a photo taken with
  the camera turned and stored sideways with an orientation tag is decoded upright, as image
  viewers show it; the tag itself is not kept.  A damaged EXIF block is ignored.

:mod:`torchvision.io` is imported on first use, not at import time (it takes about a second).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clcli.errors import BadImageError

__all__ = ["decode_image_bytes", "read_image_file", "image_from_value", "pil_to_tensor"]

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_GIF = (b"GIF87a", b"GIF89a")

_tv_decoder: tuple[Any, Any] | None = None
_tv_missing = False


def _torchvision_decoder() -> tuple[Any, Any] | None:
    """``(decode_image, ImageReadMode.RGB)`` from torchvision, imported once; ``None`` if unavailable."""
    global _tv_decoder, _tv_missing
    if _tv_decoder is None and not _tv_missing:
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # torchvision without its image decoders: Pillow does everything
            _tv_missing = True
        else:
            _tv_decoder = (decode_image, ImageReadMode.RGB)
    return _tv_decoder


def _torchvision_can_decode(data: bytes) -> bool:
    """Whether the magic bytes name a format torchvision's ``decode_image`` reads (with its EXIF orientation).

    torchvision applies the orientation tag of JPEG and PNG only, so a WebP file carrying EXIF goes
    to Pillow.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return b"EXIF" not in data[12:4096]
    return data.startswith(_JPEG) or data.startswith(_PNG) or data.startswith(_GIF)


def _is_16bit_png(data: bytes) -> bool:
    """Whether ``data`` is a PNG with 16 bits per sample (torchvision's RGB mode fails on those)."""
    return data.startswith(_PNG) and len(data) > 24 and data[24] == 16


def pil_to_tensor(img: Any) -> torch.Tensor:
    """A Pillow image as a ``uint8`` ``[3, H, W]`` RGB tensor (see the module docstring for the rules)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            if arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = arr * 255.0
            arr = np.nan_to_num(arr).round()
        elif mode != "I" or (arr.size and int(arr.max()) > 255):
            arr = arr.astype(np.int64) >> 8  # 16-bit samples: keep the high byte
        gray = np.clip(arr, 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(0).repeat(3, 1, 1)
    if mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def upright(img: Any) -> Any:
    """A Pillow image turned as its EXIF orientation tag says (``ImageOps.exif_transpose``); unchanged without one."""
    from PIL import ImageOps

    try:
        turned = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: keep the pixels as stored
        return img
    return img if turned is None else turned


def _decode_with_pil(data: bytes, where: str) -> torch.Tensor:
    """Decode ``data`` with Pillow, raising :class:`BadImageError` naming ``where`` on failure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_tensor(upright(img))
    except UnidentifiedImageError:
        raise BadImageError(where, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(where, str(exc) or type(exc).__name__) from None


def decode_image_bytes(data: bytes, where: str) -> torch.Tensor:
    """Decode an encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF, ...) into ``uint8`` ``[3, H, W]`` RGB.

    ``where`` names the image (a file path or ``"<file> row N"``) in the :class:`BadImageError`
    raised when the data cannot be decoded.
    """
    if not data:
        raise BadImageError(where, "empty image data")
    decoder = _torchvision_decoder() if _torchvision_can_decode(data) and not _is_16bit_png(data) else None
    if decoder is not None:
        decode, rgb = decoder
        try:
            with warnings.catch_warnings():  # torchvision 0.29 warns on every call that it moves to TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                exif = not data.startswith(_GIF)  # torchvision reads the orientation tag of JPEG and PNG
                out = decode(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb, apply_exif_orientation=exif
                )
        except (RuntimeError, ValueError):
            pass  # truncated or unusual file: Pillow decides (and words the error)
        else:
            if out.ndim == 4:  # animated GIF: first frame
                out = out[0]
            if out.dtype == torch.uint8 and out.shape[0] == 3:
                return out
    return _decode_with_pil(data, where)


def read_image_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read and decode an image file into ``uint8`` ``[3, H, W]`` RGB.

    Raises :class:`BadImageError` naming the file when it cannot be read or decoded.
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImageError(where, exc.strerror or str(exc)) from None
    return decode_image_bytes(data, where)


def _array_to_tensor(value: Any, where: str) -> torch.Tensor:
    """A decoded pixel array (HW, HWC or CHW; uint8, integer or float in [0, 1]) as ``uint8`` ``[3, H, W]``."""
    try:
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise BadImageError(where, f"cannot read pixel array: {exc}") from None
    if arr.dtype == object or arr.ndim not in (2, 3) or arr.size == 0:
        raise BadImageError(where, f"pixel array of shape {arr.shape} is not an image")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.shape[-1] in (1, 2, 3, 4) and arr.shape[0] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, -1, 0)  # HWC -> CHW
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr).round()
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.int64) >> 8
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    channels = arr.shape[0]
    if channels in (1, 2):
        arr = np.repeat(arr[:1], 3, axis=0)
    elif channels == 4:
        arr = arr[:3]
    elif channels != 3:
        raise BadImageError(where, f"pixel array with {channels} channels is not an image")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _resolve_path(path: str, base_dirs: tuple[str, ...]) -> str:
    """The first existing candidate for ``path``: as given when absolute, else under each base folder."""
    if os.path.isabs(path) or not base_dirs:
        return path
    for base in base_dirs:
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(base_dirs[0], path)


def image_from_value(value: Any, where: str, base_dirs: tuple[str, ...] = ()) -> torch.Tensor:
    """Turn one value of an image column into ``uint8`` ``[3, H, W]`` RGB.

    Accepts what table columns hold: a ``{"bytes": ..., "path": ...}`` mapping (the ``datasets``
    ``Image`` feature), encoded bytes, a file path (relative paths are looked up under each of
    ``base_dirs`` in turn), a Pillow image, or a pixel array / tensor.  Raises
    :class:`BadImageError` naming ``where`` when there is no usable image.
    """
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return decode_image_bytes(bytes(data), where)
        path = value.get("path")
        if path:
            return image_from_value(str(path), where, base_dirs)
        raise BadImageError(where, "the row holds no image (neither bytes nor path)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(value), where)
    if isinstance(value, (str, Path)):
        resolved = _resolve_path(str(value), base_dirs)
        if "://" in resolved:
            raise BadImageError(where, f"cannot open remote image path {resolved}")
        try:
            return read_image_file(resolved)
        except BadImageError as exc:
            raise BadImageError(where, f"{resolved}: {exc.reason}") from None
    if value is None:
        raise BadImageError(where, "the row holds no image")
    if hasattr(value, "mode") and hasattr(value, "convert"):  # a Pillow image
        try:
            return pil_to_tensor(upright(value))
        except (OSError, ValueError) as exc:
            raise BadImageError(where, str(exc)) from None
    return _array_to_tensor(value, where)
