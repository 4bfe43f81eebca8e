"""Text for CLIP: tokenizers, prompt templates and locked sentence encoders."""

from clcli.text.templates import CIFAR10_TEMPLATES, IMAGENET_TEMPLATES, TEMPLATE_SETS, fill, load_templates
from clcli.text.tokenizers import CaptionTokenizer, ClipTokenizer, default_clip_vocab, pack_tokens

__all__ = [
    "CIFAR10_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "CaptionTokenizer",
    "ClipTokenizer",
    "default_clip_vocab",
    "fill",
    "load_templates",
    "pack_tokens",
]
