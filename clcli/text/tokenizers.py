"""Tokenizers for CLIP's text tower: one trained on a run's captions, and CLIP's own BPE.

Both turn a list of strings into an int64 tensor ``[N, context_length]``: a start-of-text token,
the text's tokens, an end-of-text token, then padding.  Text longer than the context is truncated
and its last kept token replaced by the end-of-text token, so every row ends its text with one
(the text tower reads its feature there).

* :class:`CaptionTokenizer` -- a byte-level BPE (Sennrich et al. 2016; byte-level as in GPT-2 and
  CLIP, arXiv:2103.00020 section 2.4) trained on the training captions with the Hugging Face
  ``tokenizers`` library.  Its whole definition serialises to one JSON string, which
  :class:`clcli.methods.clip.CLIP` keeps in its state dict, so a run folder is self-contained.
* :class:`ClipTokenizer` -- CLIP's released BPE (49,152 merges; ``bpe_simple_vocab_16e6.txt.gz``)
  for imported OpenAI / open_clip checkpoints, with CLIP's text cleaning: ``ftfy.fix_text`` (when
  the ``ftfy`` package is installed; without it, Unicode NFC normalisation only, so mis-decoded
  "mojibake" text is not repaired), HTML unescaping, whitespace collapsing and lower-casing; the
  word-splitting pattern uses the ``regex`` package's Unicode classes.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from clcli.errors import ClcliError

__all__ = ["CaptionTokenizer", "ClipTokenizer", "default_clip_vocab", "pack_tokens"]

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"


def pack_tokens(rows: Sequence[Sequence[int]], context_length: int, sot: int, eot: int, pad: int) -> torch.Tensor:
    """``[sot, *row, eot]`` per row, truncated to ``context_length`` with ``eot`` kept last, padded with ``pad``."""
    if context_length < 2:
        raise ValueError(f"the context length must be at least 2, got {context_length}")
    out = torch.full((len(rows), context_length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = [sot, *row, eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _as_list(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
    return out


# ================================================================== trained byte-level BPE
def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ClcliError(f"the CLIP text tower needs the 'tokenizers' package: {exc}") from None
    return tokenizers


class CaptionTokenizer:
    """A byte-level BPE trained on captions (Hugging Face ``tokenizers``).

    Normalisation: Unicode NFC, whitespace runs collapsed to one space, stripped, lower-cased
    (CLIP lower-cases too).  Special tokens ``<pad>`` (id 0), ``<start_of_text>`` and
    ``<end_of_text>``.  Any text can be encoded (byte-level: no unknown tokens).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        ids = [tokenizer.token_to_id(t) for t in (PAD, SOT, EOT)]
        if any(i is None for i in ids):
            raise ClcliError("the saved caption tokenizer lacks its special tokens (<pad>, <start_of_text>, ...)")
        self.pad_id, self.sot_id, self.eot_id = (int(i) for i in ids)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, min_frequency: int = 1) -> CaptionTokenizer:
        """Learn merges from ``captions`` up to ``vocab_size`` tokens (256 bytes and 3 specials included)."""
        tk = _import_tokenizers()
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < 256 + 3:
            raise ClcliError(f"a byte-level BPE needs a vocabulary of at least 259 tokens, got {vocab_size}")
        tok = tk.Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[PAD, SOT, EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((c for c in captions if c), trainer=trainer)
        return cls(tok)

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> CaptionTokenizer:
        tk = _import_tokenizers()
        try:
            return cls(tk.Tokenizer.from_str(text))
        except Exception as exc:  # noqa: BLE001 - a corrupt tokenizer is a checkpoint problem
            raise ClcliError(f"the saved caption tokenizer cannot be read: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (no start / end tokens)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True)).strip()

    def __call__(self, texts: str | Iterable[str], context_length: int = 77) -> torch.Tensor:
        batch = _as_list(texts)
        encoded = self._tok.encode_batch(batch, add_special_tokens=False) if batch else []
        return pack_tokens([e.ids for e in encoded], context_length, self.sot_id, self.eot_id, self.pad_id)


# ====================================================================== CLIP's released BPE
@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable Unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def default_clip_vocab() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of an installed ``open_clip`` (or OpenAI ``clip``) package, if any."""
    for module in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if path.is_file():
                return path
    return None


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


class ClipTokenizer:
    """CLIP's byte-level BPE from its vocabulary file (the ``bpe_simple_vocab_16e6.txt.gz`` format).

    The file is gzip-compressed text: a header line, then merges ``"a b"`` one per line, in
    rank order; the first 49,152 - 256 - 2 are used.  The vocabulary is the 256 byte characters,
    the same with the end-of-word marker ``</w>``, one token per merge, then
    ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407); padding is id 0.
    """

    MERGES = 49152 - 256 - 2

    def __init__(self, vocab_file: str | Path) -> None:
        path = Path(vocab_file)
        if not path.is_file():
            raise ClcliError(f"CLIP vocabulary file {path} does not exist")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ClcliError(
                f"{path} is not a CLIP BPE vocabulary (a gzip text file like bpe_simple_vocab_16e6.txt.gz): {exc}"
            ) from None
        merges = [tuple(m.split()) for m in lines[1 : self.MERGES + 1]]
        if len(merges) < self.MERGES or any(len(m) != 2 for m in merges):
            raise ClcliError(
                f"{path} is not a CLIP BPE vocabulary: expected {self.MERGES} merge lines of two symbols "
                f"after the header, found {len(merges)}"
            )
        try:
            import regex
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ClcliError(f"CLIP's tokenizer needs the 'regex' package: {exc}") from None
        self.byte_encoder = _bytes_to_unicode()
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id, self.pad_id = self.encoder[SOT], self.encoder[EOT], 0
        self.vocab_size = len(vocab)
        self._cache: dict[str, str] = {}
        self._pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self.path = path

    @staticmethod
    def clean(text: str) -> str:
        """CLIP's cleaning: fix text, unescape HTML twice, collapse whitespace, lower-case."""
        text = html.unescape(html.unescape(_fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        if len(self._cache) < 100_000:
            self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` after cleaning (no start / end tokens)."""
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(chars).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.sot_id, self.eot_id, self.pad_id))
        raw = bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return raw.replace("</w>", " ").strip()

    def __call__(self, texts: str | Iterable[str], context_length: int = 77) -> torch.Tensor:
        rows = [self.encode(t) for t in _as_list(texts)]
        return pack_tokens(rows, context_length, self.sot_id, self.eot_id, self.pad_id)
