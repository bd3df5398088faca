"""Every command of docs/REPRODUCING.md runs: its ```bash blocks, in page order, on the tiny profile.

The page's section "These commands are tested" is the convention this test reads: what a
block may hold, and what the test changes (the profile, the placeholders for the user's
data, ``<key>``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from helpers import PIPELINE_SETTINGS, coco_stand_in, flickr30k_stand_in, photo_manifest, tiny_owlvit
from tokencompose_core.config import load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "REPRODUCING.md"
PAPER_PROFILES = ("sd14", "sd21")
# Each stage seconds long; two prompts, so that FID has two sampled images.
FAST = [*PIPELINE_SETTINGS, "sample.max_prompts=2", "score.clip=false"]
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def doc_commands(text: str) -> list[str]:
    """The lines of the page's ```bash blocks, continuations joined, comments and blanks left out."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                lines.append(line)
    return lines


def token_compose_stand_in(root: Path) -> str:
    """The authors' repository with their data set up, in miniature: the images of
    coco_gsam_img/train (four images) with metadata.jsonl, their masks in coco_gsam_seg/ (not yet linked)."""
    data = root / "train" / "data"
    images = data / "coco_gsam_img" / "train"
    images.mkdir(parents=True)
    rows = []
    for number in (142, 370, 395, 419):
        image_id = f"{number:012d}"
        pixels = np.full((48, 64, 3), 120, dtype=np.uint8)
        pixels[8:30, 8:30] = (200, 40, 40)
        Image.fromarray(pixels).save(images / f"{image_id}.jpg")
        (data / "coco_gsam_seg" / image_id).mkdir(parents=True)
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[8:30, 8:30] = 255
        Image.fromarray(mask).save(data / "coco_gsam_seg" / image_id / f"mask_{image_id}_plate.png")
        rows.append({"file_name": f"{image_id}.jpg", "text": "A plate with a piece of bread.",
                     "attn_list": [["plate", f"seg/{image_id}/mask_{image_id}_plate.png"], ["piece", None]]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(root)


class DocShell:
    """Runs the page's commands as the convention says, in the current directory."""

    def __init__(self, placeholders: dict[str, str], owlvit: str) -> None:
        self.placeholders, self.owlvit, self.variables = placeholders, owlvit, {}

    def run(self, line: str) -> None:
        words = shlex.split(self._expand(line), comments=True)
        assignment = ASSIGNMENT.match(words[0])
        if assignment and len(words) == 1:
            self.variables[assignment[1]] = assignment[2]
        elif words[:2] == ["ln", "-s"] and len(words) == 4:
            os.symlink(words[2], words[3])
        elif words[0] == "tokencompose":
            assert main(self._tiny(words[1:])) == 0, line
        elif words[:2] == ["accelerate", "launch"] and "-m" in words:
            from tokencompose_core.train import main as train_main

            module = words.index("-m")
            assert words[module + 1] == "tokencompose_core.train", line
            assert train_main(self._tiny(words[module + 2:], verb=None)) == 0, line
        else:
            pytest.fail(f"docs/REPRODUCING.md: a command the convention does not cover: {line}")

    def _expand(self, line: str) -> str:
        for name, value in self.placeholders.items():
            line = line.replace(f"<{name}>", value)
        leftover = re.findall(r"<(?!key>)[^<>\s]+>", line)
        assert not leftover, f"undocumented placeholders {leftover} in: {line}"
        return re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: self.variables[m[1]], line)

    def _tiny(self, words: list[str], verb: str | None = "") -> list[str]:
        """The paper profile made tiny, models.owlvit a random-init one, ``<key>`` the one matching folder."""
        words = [self._folder(word) for word in words]
        words = [f"models.owlvit={self.owlvit}" if word.startswith("models.owlvit=") else word for word in words]
        if words and words[0] == "fid-reference":
            return [*words, "--count", "4"]
        profile = words.index("-p") + 1
        assert words[profile] in PAPER_PROFILES, words
        root = load_config(words[profile]).storage.root
        words[profile] = "tiny"
        return [*words, f"storage.root={root}", *FAST]

    @staticmethod
    def _folder(word: str) -> str:
        if "<key>" not in word:
            return word
        matches = glob.glob(word.replace("<key>", "*"))
        assert len(matches) == 1, f"{word} matches {matches}"
        return matches[0]


def test_every_command_of_reproducing_runs(prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    (data / "coco-train").mkdir(parents=True)
    placeholders = {"TokenCompose": token_compose_stand_in(data / "TokenCompose"),
                    "coco-train-manifest": photo_manifest(data / "coco-train"),
                    "coco": str(Path(coco_stand_in(data / "coco")[1]).parent),
                    "flickr30k": str(data / "flickr30k")}
    flickr30k_stand_in(data / "flickr30k")
    shell = DocShell(placeholders, tiny_owlvit(data / "owlvit"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    commands = doc_commands(DOC.read_text(encoding="utf-8"))
    assert sum(line.startswith("tokencompose ") for line in commands) >= 15
    for line in commands:
        shell.run(line)
    # The training run read the import, found without --input.
    run = json.loads((work / "runs/sd14/train/tokencompose-sd14/_stage.json").read_text())
    assert Path(run["inputs"]["mask_cache"]).name.startswith("reference-")
    assert len(glob.glob("runs/sd14/scores/*coco-val2017-10k-*/fid.json")) == 2
