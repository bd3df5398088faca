"""Security: pickled code is never run, configs are data, URIs stay under the configured roots."""

from __future__ import annotations

import ast
import builtins
import json
from pathlib import Path

import pytest
import torch

from tokencompose_core import storage
from tokencompose_core.config import ConfigError, load_config
from tokencompose_core.models import UnsafeCheckpointError, load_grounding_dino, load_sam, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("tokencompose_core", "tasks", "flows", "deployments", "bench")


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _poisoned(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def test_pickle_payload_in_a_weights_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = _poisoned(tmp_path / "model.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*model.pth"):
        load_state_dict_file(checkpoint)
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pth")  # tensors only: accepted
    assert torch.equal(load_state_dict_file(tmp_path / "plain.pth")["weight"], torch.zeros(2))


def test_poisoned_sam_and_groundingdino_checkpoints_are_refused_before_building(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = str(_poisoned(tmp_path / "sam_vit_b.pth", marker))
    sam = load_config("tiny", ["models.sam.model_type=vit_b", f"models.sam.checkpoint={checkpoint}"])
    with pytest.raises(UnsafeCheckpointError):
        load_sam(sam.models)
    dino = load_config("tiny", ["models.grounding_dino.config=swint_ogc",
                                f"models.grounding_dino.checkpoint={checkpoint}"])
    with pytest.raises(UnsafeCheckpointError):
        load_grounding_dino(dino.models)
    assert not marker.exists()


def test_poisoned_training_checkpoint_is_refused(tmp_path: Path) -> None:
    from tokencompose_core.checkpoints import load_torch as _load_torch

    marker = tmp_path / "pwned"
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        _load_torch(str(_poisoned(tmp_path / "optimizer.pt", marker)))
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(dotted name, call) of every call whose function is a name or attribute chain."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                found.append((".".join([func.id, *reversed(parts)]), node))
    return found


_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"}


def _safe_yaml_load(call: ast.Call, tree: ast.AST) -> bool:
    """``yaml.load(..., Loader=X)`` where X is a SafeLoader or a class of this file derived from one."""
    safe = set(_SAFE_LOADERS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(base) in _SAFE_LOADERS for base in node.bases):
            safe.add(node.name)
    loader = {k.arg: k.value for k in call.keywords}.get("Loader")
    return loader is not None and ast.unparse(loader) in safe


def test_no_code_path_unpickles_or_evaluates_untrusted_data() -> None:
    """Every torch.load is weights_only=True; no pickle/marshal loads, eval/exec, unsafe YAML."""
    forbidden = {"pickle.load", "pickle.loads", "marshal.loads", "eval", "exec", "yaml.unsafe_load",
                 "yaml.full_load", "torch.jit.load", "numpy.load", "np.load", "dill.load", "joblib.load"}
    problems = []
    files = [path for folder in CODE_DIRS for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text("utf-8"), filename=str(path))
        for name, call in _calls(tree):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name in forbidden:
                problems.append(f"{where}: {name}")
            if name == "yaml.load" and not _safe_yaml_load(call, tree):
                problems.append(f"{where}: yaml.load without a SafeLoader")
            if name == "torch.load":
                flags = {k.arg: k.value for k in call.keywords}
                if not (isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
    assert not problems, problems


# ----------------------------------------------------------------------------- configs are data


def test_yaml_python_tags_in_a_profile_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    profile = tmp_path / "evil.yaml"
    profile.write_text(f"name: evil\ntrain:\n  max_steps: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises((ConfigError, Exception), match="python/object"):
        load_config(str(profile))
    assert not marker.exists()


def test_yaml_python_tags_in_an_override_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises((ConfigError, Exception), match="python/object"):
        load_config("tiny", [f"train.max_steps=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists()


def test_groundingdino_py_config_is_read_as_data_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "evil_gdino.py"
    config.write_text(f"backbone = 'swin_T_224_1k'\nopen({str(marker)!r}, 'w')\n")
    models = load_config("tiny", [f"models.grounding_dino.config={config}"]).models
    with pytest.raises(ValueError, match="not a simple `name = value` assignment"):
        load_grounding_dino(models, random_weights=True)
    config.write_text(f"backbone = open({str(marker)!r}, 'w')\n")  # code in a value
    with pytest.raises(ValueError):
        load_grounding_dino(models, random_weights=True)
    assert not marker.exists()


def test_unknown_config_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="train.max_stpes"):
        load_config("tiny", ["train.max_stpes=3"])


# ----------------------------------------------------------------------------- storage roots


@pytest.mark.parametrize(
    ("uri", "inside"),
    [
        ("/data/runs/x/nouns.parquet", True),
        ("/data/runs", True),
        ("/data/shared/manifest.jsonl", True),
        ("/data/runs/../secret", False),
        ("/data/runs-evil/x", False),  # a sibling sharing the prefix
        ("/etc/passwd", False),
        ("memory://data/runs/x", False),  # same path, other filesystem
        ("/data/runs/a/../../shared/ok", True),
    ],
)
def test_check_under_roots(uri: str, inside: bool) -> None:
    roots = ["/data/runs", "/data/shared/"]
    if inside:
        assert storage.check_under_roots(uri, roots) == uri
    else:
        with pytest.raises(ValueError, match="outside the configured storage roots"):
            storage.check_under_roots(uri, roots)


def test_check_input_applies_only_once_roots_are_configured(tmp_path: Path) -> None:
    open_config = load_config("tiny", [f"storage.root={tmp_path / 'runs'}"]).storage
    assert storage.check_input("/etc/passwd", open_config) == "/etc/passwd"  # local runs: unrestricted
    closed = load_config("tiny", [f"storage.root={tmp_path / 'runs'}",
                                  f"storage.allowed_roots=[{tmp_path / 'data'},{tmp_path / 'runs'}]"]).storage
    assert storage.check_input(str(tmp_path / "data" / "m.jsonl"), closed)
    assert storage.check_input(str(tmp_path / "runs" / "masks"), closed)
    with pytest.raises(ValueError, match="outside the configured storage roots"):
        storage.check_input(str(tmp_path / "data" / ".." / "secret"), closed)


@pytest.mark.parametrize(
    ("module", "flow", "extra"),
    [
        ("flows.preprocess", "nouns_flow", []),
        ("flows.preprocess", "masks_flow", []),
        ("flows.train", "train_flow", []),
        ("flows.sample", "sample_flow", []),
        ("flows.sample", "sample_flow", ["sample.prompts={outside}"]),
        ("flows.evaluate", "evaluate_flow", []),
    ],
)
def test_flows_refuse_user_uris_outside_the_storage_roots(tmp_path: Path, module: str, flow: str,
                                                          extra: list[str]) -> None:
    import importlib

    outside = tmp_path / "elsewhere" / "input.jsonl"
    overrides = [f"storage.root={tmp_path / 'runs'}",
                 f"storage.allowed_roots=[{tmp_path / 'data'},{tmp_path / 'runs'}]",
                 *(item.format(outside=outside) for item in extra)]
    function = getattr(importlib.import_module(module), flow).fn  # the flow body, without a Prefect run
    with pytest.raises(ValueError, match="outside the configured storage roots"):
        function(profile="tiny", overrides=overrides, input_uri=None if extra else str(outside))


def test_a_symlink_inside_a_root_that_points_outside_is_refused(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.jsonl").write_text("{}\n")
    (data / "link.jsonl").symlink_to(elsewhere / "secret.jsonl")
    (data / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    (data / "real.jsonl").write_text("{}\n")
    closed = load_config("tiny", [f"storage.root={data / 'runs'}", f"storage.allowed_roots=[{data}]"]).storage
    for escape in (data / "link.jsonl", data / "linked-folder" / "secret.jsonl", data / "linked-folder" / "new"):
        with pytest.raises(ValueError, match=f"outside the configured storage roots .* resolves to {elsewhere}"):
            storage.check_input(str(escape), closed)
    assert storage.check_input(str(data / "real.jsonl"), closed)
    # A root that is itself a link (a mounted volume) holds what lies behind it.
    (tmp_path / "mounted").symlink_to(elsewhere, target_is_directory=True)
    via_link = load_config("tiny", [f"storage.root={tmp_path / 'mounted' / 'runs'}",
                                    f"storage.allowed_roots=[{tmp_path / 'mounted'}]"]).storage
    assert storage.check_input(str(elsewhere / "secret.jsonl"), via_link)
    assert storage.check_input(str(tmp_path / "mounted" / "secret.jsonl"), via_link)


# ----------------------------------------------------------------------------- roots confine writes and images


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (200, 40, 40)).save(path)
    return path


def test_a_storage_root_outside_the_allowed_roots_is_refused_before_anything_is_written(
        prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _png(data / "a.png")
    (data / "manifest.jsonl").write_text('{"image": "a.png", "captions": "a red square"}\n')
    (data / "link").symlink_to(elsewhere, target_is_directory=True)
    roots = f"storage.allowed_roots=[{data}]"
    for root, resolved in ((elsewhere / "runs", ""), (data / "link" / "runs", f" (it resolves to {elsewhere}/runs)")):
        argv = ["nouns", "-p", "tiny", f"storage.root={root}", roots, "--input", str(data / "manifest.jsonl")]
        assert main(argv) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "tokencompose: " in line]
        assert f"storage.root {str(root)!r} is outside storage.allowed_roots {[str(data)]}{resolved}" in line
        assert not list(elsewhere.iterdir())  # nothing written behind the link either
    assert main(["nouns", "-p", "tiny", f"storage.root={data / 'runs'}", roots,
                 "--input", str(data / "manifest.jsonl")]) == 0


def test_manifest_images_stay_in_the_manifests_folder_and_under_the_roots(
        prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    folder = data / "set"
    _png(folder / "good.png")
    _png(folder / "inside.png")
    _png(data / "beside.png")
    _png(elsewhere / "secret.png")
    (folder / "link.png").symlink_to(elsewhere / "secret.png")
    rows = {"good": "good.png", "inside": str(folder / "inside.png"), "beside": "../beside.png",
            "secret": str(elsewhere / "secret.png"), "link": "link.png"}
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"id": image_id, "image": image, "captions": "a red square"}) + "\n"
        for image_id, image in rows.items()))

    def nouns(*overrides: str) -> tuple[set[str], dict[str, str]]:
        assert main(["nouns", "-p", "tiny", f"storage.root={data / 'runs'}", *overrides,
                     "--input", str(folder / "manifest.jsonl")]) == 0
        summary = json.loads(capsys.readouterr().out)
        rejects = storage.read_parquet(summary["rejects_uri"])
        return (set(storage.read_parquet(summary["nouns_uri"])["image_id"]),
                dict(zip(rejects["image_id"], rejects["reason"])))

    roots = f"storage.allowed_roots=[{data}]"
    accepted, rejected = nouns(roots)
    assert accepted == {"good", "inside"} and set(rejected) == {"beside", "secret", "link"}
    assert rejected["beside"] == f"image path not allowed: '../beside.png' leaves the manifest's folder {folder}"
    assert rejected["secret"] == (f"image path not allowed: {str(elsewhere / 'secret.png')!r} is outside the "
                                  f"configured storage roots {[str(data)]}")
    assert rejected["link"].endswith(f"is outside the configured storage roots {[str(data)]} "
                                     f"(it resolves to {elsewhere / 'secret.png'})")

    accepted, rejected = nouns(roots, "nouns.allow_absolute_image_paths=false")
    assert accepted == {"good"} and set(rejected) == {"beside", "secret", "link", "inside"}
    assert rejected["inside"].startswith(f"image path not allowed: {str(folder / 'inside.png')!r} is absolute")

    accepted, rejected = nouns()  # no roots (local runs): absolute paths anywhere, '..' still refused
    assert accepted == {"good", "inside", "secret", "link"} and set(rejected) == {"beside"}


def test_image_path_rules_count_in_stage_ones_key(tmp_path: Path) -> None:
    from tokencompose_core.stages import stage_fingerprint, stage_settings

    root = f"storage.root={tmp_path / 'runs'}"
    default = load_config("tiny", [root])
    assert set(stage_settings(default, "nouns")["nouns"]) == set(default.nouns.model_dump()) - {
        "manifest", "batch_size"} | {"image_roots"}
    for restricting in ("nouns.allow_absolute_image_paths=false", f"storage.allowed_roots=[{tmp_path}]"):
        changed = load_config("tiny", [root, restricting])
        assert stage_fingerprint(changed, "nouns") != stage_fingerprint(default, "nouns"), restricting
