"""The tiny MMDiT profiles' T5 tokenizer: a small SentencePiece-style Unigram vocabulary built offline.

No wheel ships T5's vocabulary, so ``configs/models/tiny-sd3/tokenizer_3`` and
``configs/models/tiny-flux/tokenizer_2`` hold one trained here, with the ``tokenizers``
library transformers already needs (no new dependency), from

* the 1,000 COCO dev captions of the shared folder (``captions_nouns_dev.jsonl``, its
  ``text`` field; no other COCO captions), and
* the words of the MultiGen prompt sets the package ships,

each distinct word also in lower case and capitalised, so a caption's first word and
a lowercase noun both have whole-word pieces. Every ASCII letter, digit and punctuation
mark is a piece of its own, so any ASCII caption tokenizes without ``<unk>``.

The result is a transformers ``T5Tokenizer`` with T5's semantics: ``<pad>`` = 0,
``</s>`` = 1 appended, ``<unk>`` = 2, no start token, "▁" marking word starts. Rebuild
(the output is the same on every run)::

    python -m tokencompose_core.models.t5_vocab [--captions ../shared/data/coco/captions_nouns_dev.jsonl]
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import T5Tokenizer

from tokencompose_core.models.architectures import arch_dir
from tokencompose_core.sampling import MULTIGEN_SETS, load_prompts
from tokencompose_core.storage import atomic_write_bytes

# T5's special pieces, in T5's id order.
SPECIALS = ("<pad>", "</s>", "<unk>")
VOCAB_SIZE = 4000
# Pieces of their own, so that any ASCII caption tokenizes without <unk>.
ALPHABET = string.ascii_letters + string.digits + string.punctuation
# Real T5 tokenizers declare 512; the pipelines pass their own ``max_sequence_length``.
MODEL_MAX_LENGTH = 512
# Unigram training sums scores over threads; rounding makes the shipped files identical on every run.
_SCORE_DECIMALS = 6
_APPENDED_BAND = 0.01
# Where the tiny profiles keep their T5 tokenizer.
TOKENIZER_FOLDERS = (("tiny-sd3", "tokenizer_3"), ("tiny-flux", "tokenizer_2"))
DEFAULT_CAPTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco" / "captions_nouns_dev.jsonl"


def training_texts(captions: Sequence[str]) -> list[str]:
    """The captions, then every distinct word of them and of the MultiGen prompts, lower-cased and capitalised."""
    prompts = [prompt.text for name in MULTIGEN_SETS for prompt in load_prompts(f"multigen:{name}")]
    words = sorted({word.strip(string.punctuation) for text in [*captions, *prompts] for word in text.split()} - {""})
    variants = sorted({form for word in words for form in (word.lower(), word.capitalize())})
    return [*captions, *variants]


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> T5Tokenizer:
    """A T5 tokenizer whose Unigram vocabulary is trained on ``texts`` (T5's pre-tokenization)."""
    from tokenizers import Tokenizer, models, trainers

    # T5Tokenizer's own pre-tokenizer, so pieces are learned on the words it will see.
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = T5Tokenizer(vocab=[(s, 0.0) for s in SPECIALS], extra_ids=0).backend_tokenizer.pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        unk_token="<unk>",
        max_piece_length=16,
    )
    backend.train_from_iterator(list(texts), trainer)
    learned = {p: round(s, _SCORE_DECIMALS) for p, s in json.loads(backend.to_str())["model"]["vocab"]}
    # The trainer keeps every character of the texts, giving the ones it pruned scores a few
    # 1e-4 steps above its lowest piece, in an order that changes between runs. Those, and the
    # ASCII characters the texts lack, share one score below every learned piece instead.
    lowest = min(s for p, s in learned.items() if len(p) > 1 and p not in SPECIALS)
    floor = lowest - 1.0
    learned = {p: floor if len(p) == 1 and s < lowest + _APPENDED_BAND else s for p, s in learned.items()}
    learned |= {c: floor for c in ALPHABET if c not in learned}
    pieces = sorted(((p, s) for p, s in learned.items() if p not in SPECIALS), key=lambda item: (-item[1], item[0]))
    return T5Tokenizer(vocab=[(s, 0.0) for s in SPECIALS] + pieces, extra_ids=0, model_max_length=MODEL_MAX_LENGTH)


def read_captions(path: Path) -> list[str]:
    """The ``text`` of each line of a captions JSONL file."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="the COCO dev captions JSONL")
    args = parser.parse_args(argv)
    tokenizer = train_t5_tokenizer(training_texts(read_captions(args.captions)))
    with tempfile.TemporaryDirectory() as temp:
        tokenizer.save_pretrained(temp)
        files = sorted(Path(temp).iterdir())
        for arch, folder in TOKENIZER_FOLDERS:
            for file in files:
                atomic_write_bytes(str(arch_dir(arch) / folder / file.name), file.read_bytes())
            print(f"wrote {arch_dir(arch) / folder} ({len(tokenizer)} pieces)")


if __name__ == "__main__":
    main()
