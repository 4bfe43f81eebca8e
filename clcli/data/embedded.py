"""Small data sets that ship with the installed packages and need no download (``embedded:NAME``).

``embedded:digits`` is scikit-learn's handwritten digits (``sklearn.datasets.load_digits``):
1,797 grayscale images of 8x8 pixels in ten classes.  Pixel values 0..16 are scaled to 0..255
and repeated to three channels; images are not resized.  The split is fixed: a permutation drawn
with ``numpy.random.default_rng(0)``, whose first 1,437 records are ``train`` and the other 360
``test``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from clcli.data.base import ImageSource, MapStream, StreamSource
from clcli.errors import DataError

__all__ = ["DigitsSource", "EMBEDDED_NAMES", "EMBEDDED_SPLITS", "embedded_splits", "open_embedded"]

EMBEDDED_NAMES = ("digits",)
EMBEDDED_SPLITS = ("train", "test")
DIGITS_TRAIN_SIZE = 1437
DIGITS_SEED = 0


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()`` images (float, 0..16, ``[1797, 8, 8]``) and targets, read once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


class DigitsSource(ImageSource):
    """scikit-learn's 8x8 handwritten digits, one fixed split (see the module docstring)."""

    def __init__(self, spec: str, split: str) -> None:
        if split not in EMBEDDED_SPLITS:
            raise DataError(f"{spec} has no split {split!r}; available splits: {', '.join(EMBEDDED_SPLITS)}")
        images, targets = _digits_arrays()
        order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
        chosen = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
        pixels = np.clip(np.round(images[chosen] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.spec = spec
        self.split = split
        self.classes = [str(k) for k in range(10)]
        self._pixels = torch.from_numpy(pixels)  # [N, 8, 8]
        self._targets = torch.from_numpy(targets[chosen])
        self._rows = chosen.tolist()  # row in load_digits(), for describe()

    def __len__(self) -> int:
        return int(self._pixels.shape[0])

    def load_image(self, i: int) -> torch.Tensor:
        """Record ``i`` as a ``uint8`` ``[3, 8, 8]`` tensor (the gray value on all three channels)."""
        return self._pixels[i].unsqueeze(0).repeat(3, 1, 1)

    def label(self, i: int) -> int:
        return int(self._targets[i])

    def labels(self) -> torch.Tensor:
        return self._targets.clone()

    def text(self, i: int) -> str | None:
        return None

    def describe(self, i: int) -> str:
        return f"{self.spec} {self.split} record {i} (load_digits row {self._rows[i]})"

    def fingerprint(self) -> dict[str, Any]:
        """The set's name and split, the fixed split's seed and size, and scikit-learn's version."""
        import sklearn

        return {
            "kind": "embedded",
            "name": "digits",
            "split": self.split,
            "seed": DIGITS_SEED,
            "train_size": DIGITS_TRAIN_SIZE,
            "sklearn": sklearn.__version__,
        }


def open_embedded(
    spec: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    streaming: bool = False,
) -> ImageSource | StreamSource:
    """Open ``embedded:NAME``; an unknown name is a :class:`DataError` listing the available ones.

    The columns are fixed, so naming one is an error; ``streaming=True`` reads the set in order as
    a :class:`~clcli.data.base.MapStream`.  This is the built-in ``embedded`` entry of
    :data:`clcli.registry.SOURCES`.
    """
    spec = str(spec).strip()
    if any(value is not None for value in (image_column, label_column, text_column)):
        raise DataError(f"{spec} has fixed columns; image_column/label_column/text_column do not apply")
    name = spec.split(":", 1)[1].strip()
    if name != "digits":
        available = ", ".join(f"embedded:{n}" for n in EMBEDDED_NAMES)
        raise DataError(f"unknown embedded data set {spec!r}; available: {available}")
    source = DigitsSource(spec, split)
    return MapStream(source) if streaming else source


def embedded_splits(spec: str) -> list[str]:
    """The splits of an embedded data set (empty for an unknown name)."""
    name = spec.split(":", 1)[1].strip() if ":" in spec else ""
    return list(EMBEDDED_SPLITS) if name in EMBEDDED_NAMES else []
