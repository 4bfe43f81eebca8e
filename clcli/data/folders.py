"""Image folders: a folder tree of images as a labelled (or unlabelled) source.

The extensions looked for are :data:`clcli.data.base.IMAGE_EXTENSIONS` (any case); hidden files and
hidden folders are skipped.  :class:`FolderSource` reads a folder tree with these rules: when the
folder has sub-folders named like splits (:data:`clcli.data.base.SPLIT_NAMES`: ``train/``,
``test/``, ``val/``, ...) every sub-folder that holds images is a split; otherwise the folder is the
``train`` split and the only split.  Inside a split, class sub-folders give labels (the sorted
folder names are the classes; for split folders, the union over all splits so labels agree between
splits) and loose images beside class folders are ignored; a folder with no class sub-folders is
unlabelled.  A ``.txt`` file with the same stem as an image is its caption.

:class:`ImageFiles` is every image of a folder (recursively) or one image file, without labels, for
classifying a collection of images (``clcli zeroshot --images``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from clcli.data.base import IMAGE_EXTENSIONS, SPLIT_NAMES, ImageSource, check_index, files_digest, is_image_name
from clcli.data.images import read_image_file
from clcli.errors import DataError

__all__ = ["FolderSource", "ImageFiles", "folder_splits", "subfolders", "walk_images"]


def _no_images(folder: Path | str) -> str:
    """The message for a folder without images, naming the extensions looked for."""
    return f"{folder} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"


def subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot read data folder {folder}: {exc.strerror or exc}") from None
    return sorted((Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")), key=lambda p: p.name)


def walk_images(folder: Path) -> list[tuple[str, str | None]]:
    """All images under ``folder`` (recursively) as sorted ``(path, caption path or None)`` pairs."""
    found: list[tuple[str, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names = set(filenames)
        for name in filenames:
            if is_image_name(name):
                caption = os.path.splitext(name)[0] + ".txt"
                found.append(
                    (os.path.join(dirpath, name), os.path.join(dirpath, caption) if caption in names else None)
                )
    found.sort(key=lambda item: Path(item[0]).relative_to(folder).as_posix())
    return found


def _has_images(folder: Path) -> bool:
    """Whether any image file lies under ``folder``."""
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_name(n) for n in filenames):
            return True
    return False


def _loose_images(folder: Path) -> list[tuple[str, str | None]]:
    """The images directly inside ``folder`` (not in sub-folders), sorted, with their captions."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    present = set(names)
    out: list[tuple[str, str | None]] = []
    for name in names:
        if is_image_name(name):
            caption = os.path.splitext(name)[0] + ".txt"
            out.append((str(folder / name), str(folder / caption) if caption in present else None))
    return out


def folder_splits(root: Path) -> dict[str, Path] | None:
    """Split name -> folder when ``root`` is organised by split folders, else ``None``."""
    subs = subfolders(root)
    if not any(p.name.lower() in SPLIT_NAMES for p in subs):
        return None
    return {p.name: p for p in subs if _has_images(p)}


def _class_folders(folder: Path) -> list[Path]:
    """The class sub-folders of ``folder``: those that hold at least one image."""
    return [p for p in subfolders(folder) if _has_images(p)]


class FolderSource(ImageSource):
    """Images in a folder tree (see the module docstring for the layout rules)."""

    def __init__(self, spec: str, root: Path, split: str) -> None:
        splits = folder_splits(root)
        if splits is None:
            if split != "train":
                raise DataError(
                    f"{root} has no split folders (train/, test/, ...), so it is only the 'train' split; "
                    f"there is no split {split!r}; available splits: train"
                )
            folder = root
            class_names = [p.name for p in _class_folders(root)]
        else:
            if split not in splits:
                if (root / split).is_dir():
                    raise DataError(_no_images(root / split))
                available = ", ".join(sorted(splits)) or "none"
                raise DataError(f"{root} has no split {split!r}; available splits: {available}")
            folder = splits[split]
            class_names = sorted({p.name for s in splits.values() for p in _class_folders(s)})
        own_classes = _class_folders(folder)
        items: list[tuple[str, str | None]] = []
        targets: list[int] = []
        if own_classes:
            index = {name: k for k, name in enumerate(class_names)}
            for class_dir in own_classes:
                found = walk_images(class_dir)
                items.extend(found)
                targets.extend([index[class_dir.name]] * len(found))
            self.classes: list[str] | None = class_names
        else:
            items = _loose_images(folder)
            self.classes = None
        if not items:
            raise DataError(_no_images(folder))
        self.spec = spec
        self.split = split
        self.root = str(root)
        self._paths = [path for path, _ in items]
        self._captions = {k: caption for k, (_, caption) in enumerate(items) if caption is not None}
        self._targets = torch.tensor(targets, dtype=torch.int64) if self.classes is not None else None

    def __len__(self) -> int:
        return len(self._paths)

    def load_image(self, i: int) -> torch.Tensor:
        return read_image_file(self._paths[i])

    def label(self, i: int) -> int:
        i = check_index(i, len(self._paths), self.root)
        return -1 if self._targets is None else int(self._targets[i])

    def labels(self) -> torch.Tensor | None:
        return None if self._targets is None else self._targets.clone()

    def text(self, i: int) -> str | None:
        caption = self._captions.get(check_index(i, len(self._paths), self.root))
        if caption is None:
            return None
        try:
            with open(caption, encoding="utf-8", errors="replace") as fh:
                return fh.read().strip()
        except OSError:
            return None

    def describe(self, i: int) -> str:
        return self._paths[i]

    def fingerprint(self) -> dict[str, Any]:
        """The split and the sorted image files with their sizes and modification times."""
        return {"kind": "folder", "split": self.split, "n": len(self._paths), "files": files_digest(self._paths)}


class ImageFiles(ImageSource):
    """The images of one file or of a folder (recursively, sorted by path), without labels.

    A folder is read with :func:`walk_images`; a file is taken as it is, whatever its extension.
    The split is ``"images"``; there are no classes and no captions.
    """

    def __init__(self, path: str | Path) -> None:
        root = Path(path).expanduser()
        if root.is_file():
            files = [str(root)]
        elif root.is_dir():
            files = [image for image, _caption in walk_images(root)]
        else:
            raise DataError(f"{root} does not exist")
        if not files:
            raise DataError(_no_images(root))
        self.spec, self.split, self.classes = str(root), "images", None
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def load_image(self, i: int) -> torch.Tensor:
        return read_image_file(self._files[i])

    def label(self, i: int) -> int:
        return -1

    def labels(self) -> torch.Tensor | None:
        return None

    def text(self, i: int) -> str | None:
        return None

    def describe(self, i: int) -> str:
        return self._files[i]

    def fingerprint(self) -> dict[str, Any]:
        """The image files with their sizes and modification times."""
        return {"kind": "files", "n": len(self._files), "files": files_digest(self._files)}
