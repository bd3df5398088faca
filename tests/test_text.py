"""Noun phrases and their token positions in the SD (CLIP) tokenization."""

from __future__ import annotations

import pytest

from tokencompose_core.models import clip_tokenizer
from tokencompose_core.text import (
    NOT_CONTIGUOUS,
    NOT_FOUND,
    TRUNCATED,
    TokenPositions,
    choose_caption,
    extract_nouns,
    extract_nouns_batch,
    token_positions,
)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.mark.parametrize(
    "caption, nouns",
    [
        ("A cat is lying on its back in a man's lap.", ["cat", "back", "man", "lap"]),
        ("a wine glass next to a brown teddy bear and a t-shirt", ["wine glass", "teddy bear", "t-shirt"]),
        # Rules that follow the reference tagger (text.py): modifiers, verbs tagged as nouns.
        ("A teddy bear and a cat in a living room", ["bear", "cat", "room"]),
        ("A grey tabby cat next to a fire hydrant", ["tabby cat", "fire hydrant"]),
        ("A dog lays on a bench while a bull walking", ["dog", "bench", "bull"]),
        ("a close up of a grey and white cat", ["up", "cat"]),
        ("A dog chases another dog near the Dog house.", ["dog", "Dog house"]),
        ("A Smart Car parked next to a parking meter", ["Smart Car", "parking meter"]),
        ("It is very big and red.", []),
    ],
)
def test_extract_nouns(caption: str, nouns: list[str]) -> None:
    assert extract_nouns(caption) == nouns


def test_agreement_with_the_reference_noun_lists(shared_dir) -> None:
    """Micro F1 against the reference pipeline's noun lists on the 1,000 dev captions."""
    import importlib.util
    import json
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "nouns_agreement.py"
    spec = importlib.util.spec_from_file_location("nouns_agreement", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = shared_dir / "data" / "coco" / "captions_nouns_dev.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    predicted = extract_nouns_batch([row["text"] for row in rows])
    reference = [[noun for noun, _ in row["attn_list"]] for row in rows]
    assert module.agreement(predicted, reference)["f1"] >= 0.97


class _FlairToken:
    def __init__(self, text: str, tag: str) -> None:
        self.text, self.tag, self.whitespace_after = text, tag, 1


class _FlairStub:
    """flair's Sentence and SequenceTagger as far as the tagger path uses them."""

    TAGS = {"teddy": "JJ", "wooden": "JJ", "a": "DT", "on": "IN", "and": "CC", "is": "VBZ"}

    class Sentence:
        def __init__(self, text: str) -> None:
            self.tokens = [_FlairToken(word, "") for word in text.split()]

    class SequenceTagger:
        loaded: list[str] = []

        @classmethod
        def load(cls, path: str):
            cls.loaded.append(path)
            return cls()

        def predict(self, sentences, mini_batch_size: int) -> None:
            for sentence in sentences:
                for token in sentence.tokens:
                    token.tag = _FlairStub.TAGS.get(token.text.lower(), "NNP" if token.text[0].isupper() else "NN")


@pytest.fixture
def flair_stub(monkeypatch):
    import sys
    import types

    from tokencompose_core.text import load_flair

    modules = {"flair": types.ModuleType("flair"), "flair.data": types.ModuleType("flair.data"),
               "flair.models": types.ModuleType("flair.models")}
    modules["flair.data"].Sentence = _FlairStub.Sentence
    modules["flair.models"].SequenceTagger = _FlairStub.SequenceTagger
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    load_flair.cache_clear()
    yield _FlairStub
    load_flair.cache_clear()


def test_flair_tagger_merges_nn_runs_like_the_reference(flair_stub, tmp_path) -> None:
    weights = tmp_path / "pos-english.pt"
    weights.write_bytes(b"stub")
    captions = ["a teddy bear on a wooden table", "a Hot Dog stand and a dog and a Dog", "is"]
    nouns = extract_nouns_batch(captions, model=str(weights), tagger="flair")
    assert nouns == [["bear", "table"], ["Hot Dog stand", "dog"], []]
    assert flair_stub.SequenceTagger.loaded == [str(weights)]


def test_flair_without_cached_model_names_it(flair_stub) -> None:
    from tokencompose_core.models import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="flair/pos-english.*huggingface-cli download"):
        extract_nouns("a dog", tagger="flair")


def test_flair_not_installed_names_the_extra(monkeypatch) -> None:
    import sys

    from tokencompose_core.text import load_flair

    monkeypatch.setitem(sys.modules, "flair", None)
    monkeypatch.setitem(sys.modules, "flair.models", None)
    load_flair.cache_clear()
    with pytest.raises(ImportError, match=r"tokencompose\[flair\]"):
        extract_nouns("a dog", tagger="flair")
    with pytest.raises(ValueError, match="unknown tagger"):
        extract_nouns("a dog", tagger="nltk")


def test_batch_matches_single() -> None:
    captions = ["a bowl of apples", "two zebras on a field", "!!!"]
    assert extract_nouns_batch(captions, batch_size=2) == [extract_nouns(c) for c in captions]


def test_positions_of_a_multi_word_noun(tokenizer) -> None:
    # [<start>, a, photo, of, a, wine, glass, <end>]
    assert token_positions("a photo of a wine glass", "wine glass", tokenizer) == [5, 6]
    assert token_positions("a photo of a wine glass", "photo", tokenizer) == [2]


def test_positions_are_case_insensitive_and_hyphen_tolerant(tokenizer) -> None:
    assert token_positions("A Photo of a Wine Glass", "wine glass", tokenizer) == [5, 6]
    caption = "a man in a t-shirt"
    assert token_positions(caption, "t - shirt", tokenizer) == token_positions(caption, "t-shirt", tokenizer)
    assert len(token_positions(caption, "t-shirt", tokenizer)) == 3  # t, -, shirt


def test_multi_piece_word_keeps_every_piece(tokenizer) -> None:
    caption = "a teddybear on a bed"
    positions = token_positions(caption, "teddybear", tokenizer)
    pieces = tokenizer("teddybear", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and positions == list(range(2, 2 + len(pieces)))
    assert tokenizer(caption)["input_ids"][positions[0] : positions[-1] + 1] == pieces


def test_repeated_noun_takes_the_first_occurrence(tokenizer) -> None:
    assert token_positions("a dog chases a dog", "dog", tokenizer) == [2]


def test_failures_carry_a_reason(tokenizer) -> None:
    typo = token_positions("a photo of a cat", "caat", tokenizer)
    assert isinstance(typo, TokenPositions) and typo == [] and typo.reason == NOT_FOUND
    # A whole-word match only: "bear" is not a word of "teddybear".
    assert token_positions("a teddybear", "bear", tokenizer).reason == NOT_FOUND
    long_caption = "a " * 80 + "dog"
    cut = token_positions(long_caption, "dog", tokenizer)
    assert cut == [] and cut.reason == TRUNCATED
    assert token_positions("a " * 73 + "dog", "dog", tokenizer) == [74]  # 75 is the last usable
    assert token_positions("a " * 74 + "dog", "dog", tokenizer) == [75]
    assert token_positions("a " * 75 + "dog", "dog", tokenizer).reason == TRUNCATED
    assert token_positions("a cat", "", tokenizer).reason == NOT_FOUND
    assert token_positions("a cat", "cat", tokenizer).reason is None


def test_span_straddling_a_token_is_not_contiguous() -> None:
    class CharPairs:  # a tokenizer whose pieces are character pairs: "abcd" -> ab, cd
        model_max_length = 77

        def __call__(self, text, add_special_tokens=False, verbose=False):
            squashed = text.replace(" ", "")
            return {"input_ids": [squashed[i : i + 2] for i in range(0, len(squashed), 2)]}

    assert token_positions("xab cd", "cd", CharPairs()).reason == NOT_CONTIGUOUS  # pieces xa, bc, d
    assert token_positions("xa bc", "bc", CharPairs()) == [2]


def test_choose_caption_defaults_to_the_first() -> None:
    assert choose_caption(["one", "two"]) == "one"
    with pytest.raises(ValueError):
        choose_caption([])


def test_clip_caption_choice_picks_the_most_similar_caption(tokenizer) -> None:
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tokencompose_core.text import CaptionSelector

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    selector = CaptionSelector(model, processor)
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    captions = ["a purple square", "a dog on a bed", "two cats"]
    with torch.no_grad():
        image_embed = model.get_image_features(**processor(images=image, return_tensors="pt")).pooler_output
        text_embed = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True)).pooler_output
    similarity = torch.nn.functional.cosine_similarity(image_embed, text_embed)
    assert int(similarity.argmax()) != 0  # so that "always the first" would fail
    assert choose_caption(captions, image, selector) == captions[int(similarity.argmax())]
    assert choose_caption(["only one"], image, selector) == "only one"
