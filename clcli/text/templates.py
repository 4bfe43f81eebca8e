"""Prompt templates for zero-shot classification and for captions made from class names.

The CIFAR-10 (18 prompts) and ImageNet (80 prompts) lists are the ones released with CLIP
(Radford et al. 2021, arXiv:2103.00020, section 3.1.4 "prompt engineering and ensembling"); a
class name replaces ``{}`` (``{label}`` is accepted too).  :func:`load_templates` resolves a
template-set name, a file (one template per line; blank lines and lines starting with ``#`` are
skipped) or a single template written inline.
"""

from __future__ import annotations

from pathlib import Path

from clcli.errors import ClcliError

__all__ = [
    "CIFAR10_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "SIMPLE_TEMPLATES",
    "TEMPLATE_SETS",
    "fill",
    "load_templates",
]

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

CIFAR10_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": SIMPLE_TEMPLATES,
    "cifar10": CIFAR10_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
}


def _normalise(template: str, where: str) -> str:
    t = template.replace("{label}", "{}")
    if t.count("{}") != 1:
        raise ClcliError(f"template {template!r} ({where}) must hold exactly one {{}} or {{label}} for the label")
    return t


def fill(template: str, label: str) -> str:
    """``template`` with its ``{}`` (or ``{label}``) replaced by ``label``."""
    return template.replace("{label}", "{}").replace("{}", label)


def load_templates(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Templates from a set name (``simple``, ``cifar10``, ``imagenet``), a file, or one inline template.

    A list is taken as the templates themselves.  A string containing ``{}`` or ``{label}`` that is
    not an existing file is one inline template.  Every template must hold exactly one placeholder.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ClcliError("the template list is empty")
        return [_normalise(t, "in the list") for t in spec]
    name = spec.strip()
    if name.lower() in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name.lower()])
    path = Path(name).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClcliError(f"cannot read the template file {path}: {exc}") from None
        templates = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not templates:
            raise ClcliError(f"the template file {path} holds no templates (one per line, with {{}} for the label)")
        return [_normalise(t, f"{path} line") for t in templates]
    if "{}" in name or "{label}" in name:
        return [_normalise(name, "inline")]
    raise ClcliError(
        f"unknown template set {spec!r}: give one of {', '.join(TEMPLATE_SETS)}, a file with one template per "
        "line, or a template such as 'a photo of a {}.'"
    )
