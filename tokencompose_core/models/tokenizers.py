"""The CLIP (SD and SDXL's two), OWLv2 and BERT tokenizers, built offline.

The CLIP BPE vocabulary comes from the open_clip wheel; the BERT WordPiece vocabulary
is kept in the repo (``configs/models/tiny/grounding_dino/vocab.txt``).
"""

from __future__ import annotations

import gzip
import importlib.resources
from functools import lru_cache
from typing import Any

from transformers import BertTokenizer, CLIPTokenizer

from tokencompose_core.models.architectures import TINY, arch_dir

CLIP_MAX_LENGTH = 77
OWLV2_MAX_LENGTH = 16


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table (in CLIP's vocab order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The SD/CLIP vocabulary and merges, rebuilt from open_clip's BPE file (as CLIP does)."""
    bpe_file = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _build_clip_tokenizer(**kwargs: Any) -> CLIPTokenizer:
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The Stable Diffusion CLIP tokenizer, built offline (ids as SD's, max length 77)."""
    return _build_clip_tokenizer(model_max_length=CLIP_MAX_LENGTH)


@lru_cache(maxsize=1)
def clip_tokenizer_2() -> CLIPTokenizer:
    """SDXL's second tokenizer (OpenCLIP ViT-bigG/14's): the same BPE as :func:`clip_tokenizer`,
    padding with "!" (id 0) instead of the end token, so every caption token keeps its position."""
    return _build_clip_tokenizer(model_max_length=CLIP_MAX_LENGTH, pad_token="!")


def owlv2_tokenizer() -> CLIPTokenizer:
    """OWLv2's text tokenizer, built offline."""
    # OWLv2 pads with "!" (id 0) to 16 tokens; otherwise the same BPE as SD.
    return _build_clip_tokenizer(model_max_length=OWLV2_MAX_LENGTH, pad_token="!")


def local_bert_tokenizer() -> BertTokenizer:
    """Uncased WordPiece tokenizer from the vocabulary kept in the repo (no download).

    ``vocab.txt`` holds BERT's special tokens, ASCII punctuation, digits and letters
    (with ``##`` continuations) and the words of the MultiGen prompts and of COCO
    captions, so any lowercase ASCII caption tokenizes; rarer words split into letters.
    """
    lines = (arch_dir(TINY) / "grounding_dino" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return BertTokenizer(vocab={token: index for index, token in enumerate(lines)}, do_lower_case=True)
