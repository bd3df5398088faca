"""The embedded demo, a recipe over the five stages: does token-level grounding help composition?

1. The synthetic world (tokencompose_core.synthetic) stands in for stages 1-2: :func:`build_world`
   writes each split (``train``, ``test``, and ``pretrain`` when the base model sees fewer
   objects) as the standard stage outputs, ``<root>/nouns/world-<split>-<key>/`` (images,
   ``manifest.jsonl``, ``nouns.parquet``) and ``<root>/masks/world-<split>-<key>/`` (the exact
   masks as a mask cache), sealed like any stage output, and the test prompts as a prompt
   table beside the test split.
2. The recipe: :func:`model_names` lists the training runs (``base``, then ``plain-s<seed>``
   and ``grounded-s<seed>`` per fine-tune seed) and :func:`run_overrides` says what each is:
   the demo profile plus overrides (steps, learning rate, seed, grounding weights, the U-Net
   it starts from). Each run goes through the stage flows train -> sample -> score
   (flows/demo.py); a plain and a grounded fine-tune of one seed share data order, noise
   and steps, and differ only in the loss.
3. :func:`write_results`: stage 5's report writer on the runs' scores, its answer first
   (:class:`tokencompose_core.reports.Claim`: grounded minus plain per seed, each metric's
   95% paired interval, the conclusion the seeds allow together), plus grids, loss curves,
   ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tokencompose_core import outputs, reports, storage, synthetic
from tokencompose_core.config import ConfigError, PipelineConfig, WorldConfig, load_config
from tokencompose_core.evaluation import read_image
from tokencompose_core.identity import uri_identity, value_hash
from tokencompose_core.reports import Claim, RunScores, load_run_scores, markdown_table, pyplot, save_figure

# The CPU demo (``make demo``) and its toy-size smoke version (``--quick``).
PROFILES = {False: "demo", True: "demo-quick"}
INTERVAL_RESAMPLES = 10_000
PROMPTS_FILE = "test-prompts.jsonl"


def demo_overrides(out: str | None = None, overrides: list[str] | None = None) -> list[str]:
    """``overrides`` (``section.field=value``) of the demo profile, rooted at ``out`` when given."""
    return [*(overrides or []), *([f"storage.root={json.dumps(out)}"] if out else [])]


def demo_profile(quick: bool = False, profile: str | None = None) -> str:
    """The profile a demo runs: ``profile`` (another demo profile, e.g. ``demo-gpu``), else the
    quick or the CPU demo."""
    if quick and profile:
        raise ConfigError(f"--quick is the {PROFILES[True]} profile: give --quick or --profile {profile}, not both")
    return profile or PROFILES[quick]


def load_demo_config(quick: bool = False, out: str | None = None, overrides: list[str] | None = None,
                     profile: str | None = None) -> PipelineConfig:
    """The demo profile (:func:`demo_profile`) with ``overrides``, rooted at ``out``; a profile
    without a ``demo`` section is refused (it would run the demo on defaults)."""
    name = demo_profile(quick, profile)
    config = load_config(name, demo_overrides(out, overrides))
    if "demo" not in config.model_fields_set:
        raise ConfigError(f"profile {name!r} has no demo section; demo profiles: demo, demo-quick, demo-gpu")
    return config


def model_names(config: PipelineConfig) -> list[str]:
    """``base``, then ``plain-s<seed>`` and ``grounded-s<seed>`` per fine-tune seed."""
    names = ["base"]
    for seed in config.demo.finetune_seeds:
        names += [f"plain-s{seed}", f"grounded-s{seed}"]
    return names


# ----------------------------------------------------------------------------- the recipe


def run_overrides(config: PipelineConfig, model: str, base_run: str | None = None) -> list[str]:
    """The training run ``model`` as overrides of the demo profile: its phase's steps, learning
    rate and batch; ``base`` pre-trains from the random-init model without grounding, a
    fine-tune starts from ``base_run`` with its seed, ``plain`` without grounding.

    Without grounding the grounding settings are the defaults: they have no effect then,
    so a grounding ablation keeps the base and plain runs (and their caches).
    """
    demo = config.demo
    phase = demo.base if model == "base" else demo.finetune
    settings: dict[str, Any] = {
        "train.max_steps": phase.steps, "train.learning_rate": phase.learning_rate,
        "train.batch_size": phase.batch_size or config.train.batch_size,
        # The demo scores attention on its own test split, so no training image is held out.
        "train.exclude_heldout": False,
        "train.torch_threads": demo.base_threads if model == "base" else demo.task_threads,
        "sample.torch_threads": demo.task_threads,
    }
    if model == "base":
        settings |= {"train.seed": 0, **_WITHOUT_GROUNDING}
    else:
        kind, seed = model.split("-s")
        # Same seed => same data order, timesteps and noise: the two fine-tunes differ only in the loss.
        settings |= {"train.seed": int(seed), "train.init_unet": base_run}
        if kind == "plain":
            settings |= _WITHOUT_GROUNDING
    return [f"{name}={json.dumps(value)}" for name, value in settings.items()]


_WITHOUT_GROUNDING = {"train.token_loss_weight": 0.0, "train.pixel_loss_weight": 0.0, "train.grounding": {}}


def score_overrides(config: PipelineConfig, world: "World") -> list[str]:
    """How every run's samples are scored: attention mIoU on the world's test split, on the
    profile's grounding layer groups (a plain run's own are the defaults), so every run's
    maps are compared on the same groups."""
    return [f"train.grounding={json.dumps(config.train.grounding.model_dump(mode='json'))}",
            f"score.mask_cache={json.dumps(world.masks['test'])}",
            f"score.torch_threads={config.demo.task_threads}"]


def sample_overrides(world: "World") -> list[str]:
    return [f"sample.prompts={json.dumps(world.prompts_uri)}"]


# ----------------------------------------------------------------------------- 1. the world


@dataclass(frozen=True)
class World:
    key: list[Any]  # what makes the world: its settings
    nouns: dict[str, str]  # split -> its stage-1 folder (images, manifest, nouns table)
    masks: dict[str, str]  # split -> its mask cache
    prompts_uri: str
    whole: bool  # every folder matches its record

    @property
    def identity(self) -> str:
        return value_hash(self.key)

    def pretrain_split(self) -> str:
        """The split the base model pre-trains on."""
        return "pretrain" if "pretrain" in self.masks else "train"


def pretrain_world(config: PipelineConfig) -> WorldConfig | None:
    """The world the base model pre-trains on when ``demo.base.max_objects`` limits it:
    the same categories and seed, scenes of at most that many objects."""
    limit, world = config.demo.base.max_objects, config.demo.world
    if limit is None or limit >= world.max_objects:
        return None
    return world.model_copy(update={"max_objects": limit, "min_objects": min(world.min_objects, limit)})


def plan_world(config: PipelineConfig) -> World:
    """The world's folders, and whether they are whole (else their damaged files are removed)."""
    demo = config.demo
    key = [demo.world.model_dump(mode="json"), demo.test_images, demo.prompt_object_counts, demo.prompts_per_count,
           demo.base.max_objects]
    splits = ["train", "test"] + (["pretrain"] if pretrain_world(config) else [])
    nouns = {split: outputs.output_folder(config, "nouns", f"world-{split}", key) for split in splits}
    masks = {split: outputs.output_folder(config, "masks", f"world-{split}", key) for split in splits}
    whole = all([outputs.keep_if_whole(folder) for folder in [*nouns.values(), *masks.values()]])
    return World(key, nouns, masks, storage.join(nouns["test"], PROMPTS_FILE), whole)


def build_world(config: PipelineConfig, nouns: dict[str, str], masks: dict[str, str],
                prompts_uri: str) -> dict[str, Any]:
    """Write every split (into the folders :func:`plan_world` named) and the test prompts."""
    from tokencompose_core.models import clip_tokenizer

    demo, tokenizer = config.demo, clip_tokenizer()
    samples = {"train": (demo.world, synthetic.train_samples(demo.world)),
               "test": (demo.world, synthetic.test_samples(demo.world, demo.test_images))}
    limited = pretrain_world(config)
    if limited is not None:
        samples["pretrain"] = (limited, synthetic.train_samples(limited))
    written = {split: synthetic.write_split(split_samples, nouns[split], masks[split], tokenizer,
                                            synthetic.world_fingerprint(split_world))
               for split, (split_world, split_samples) in samples.items()}
    prompts = synthetic.test_prompts(demo.world, demo.prompt_object_counts, demo.prompts_per_count)
    table = [{"prompt_id": p.prompt_id, "text": p.text, "categories": list(p.categories),
              "groups": [f"{len(p.categories)} objects"] + (["unseen"] if p.heldout else [])} for p in prompts]
    storage.atomic_write_bytes(prompts_uri, "".join(json.dumps(row) + "\n" for row in table).encode("utf-8"))
    return {split: {"images": info["images"], "nouns": info["nouns"]} for split, info in written.items()}


def seal_world(config: PipelineConfig, world: World) -> None:
    """Each split's folders get their stage record, made by the world's settings."""
    fingerprint = synthetic.world_fingerprint(config.demo.world)
    for split, folder in world.nouns.items():
        outputs.seal(folder, config, "nouns", fingerprint, {"world": world.key, "split": split})
    for split, folder in world.masks.items():
        outputs.seal(folder, config, "masks", fingerprint,
                     {"nouns": storage.join(world.nouns[split], "nouns.parquet"), "split": split})


# ----------------------------------------------------------------------------- 3. results


def score_record(scores_uri: str) -> dict[str, Any]:
    """One run's scores as ``results.json`` lists them: MultiGen per prompt group, the MG_k
    reported per group, attention mIoU, and where the samples and detections are."""
    multigen = storage.read_json(storage.join(scores_uri, "multigen.json"))
    return {"index_uri": multigen["index_uri"], "detections_uri": storage.join(scores_uri, "detections.parquet"),
            "multigen": multigen["groups"], "reported_ks": multigen["reported_ks"],
            "segmentation": storage.read_json(storage.join(scores_uri, "segmentation.json"))}


@dataclass(frozen=True)
class ResultsPlan:
    out_uri: str
    identity: str  # the settings and the scores it reports
    whole: bool


def plan_results(config: PipelineConfig, scores: dict[str, str]) -> ResultsPlan:
    """``<root>/reports/demo-<key>``, named after the settings and the scores it reports."""
    identity = value_hash([settings_digest(config), {model: uri_identity(uri) for model, uri in scores.items()}])
    out_uri = outputs.output_folder(config, "reports", "demo", identity)
    return ResultsPlan(out_uri, identity, outputs.keep_if_whole(out_uri))


def seal_results(config: PipelineConfig, plan: ResultsPlan, scores: dict[str, str]) -> None:
    outputs.seal(plan.out_uri, config, "demo", plan.identity, {"scores": scores})


def settings_digest(config: PipelineConfig) -> str:
    return value_hash(config.model_dump(mode="json"))


def write_results(config: PipelineConfig, scores: dict[str, str], train_runs: dict[str, str],
                  out_uri: str) -> dict[str, Any]:
    """The report (stage 5's writer, the answer first), loss curves, grids, ``results.md`` and
    ``results.json`` (every run's scores, the per-seed intervals and their conclusions)."""
    records = {model: {"model": model, **score_record(uri)} for model, uri in scores.items()}
    runs = {model: load_run_scores([uri]) for model, uri in scores.items()}
    seeds = list(config.demo.finetune_seeds)
    found = conclusions(interval_rows(runs, seeds), seeds)
    table, claims = results_table(records), conclusion_table(found, seeds)
    sentence = verdict(found, seeds)
    uris = {"png_loss_curves": plot_loss_curves(train_runs, storage.join(out_uri, "loss_curves.png"))}
    uris |= reports.write_report(runs, out_uri, title="TokenCompose demo: synthetic world", grid_prompts=6,
                                 grid_images=8, pairs=_pairs(seeds), resamples=INTERVAL_RESAMPLES,
                                 claim=Claim("Did grounding help?", sentence, claims, (uris["png_loss_curves"],)))
    for model, record in records.items():
        uris[f"png_grid_{model}"] = grid_image(record["index_uri"], storage.join(out_uri, f"grid_{model}.png"),
                                               prompts=8, images=config.sample.images_per_prompt)
    markdown = "\n".join([
        "# Does token-level grounding help? (synthetic world)", "",
        f"Profile `{config.name}`; {config.sample.images_per_prompt} images per prompt, the same initial "
        f"noise for every model; fine-tune seeds {seeds}.", "",
        "## Scores (MG_k: % of images with >= k prompt objects detected, mean ± std over image indices)", "",
        markdown_table(table), "",
        "## Grounded minus plain fine-tune per seed: difference [95% paired bootstrap interval over prompts]", "",
        markdown_table(claims), "", f"**{sentence}**", "",
        "![loss curves](loss_curves.png)", "",
    ])
    uris["results_md"] = storage.join(out_uri, "results.md")
    storage.atomic_write_bytes(uris["results_md"], markdown.encode("utf-8"))
    uris["results_json"] = storage.join(out_uri, "results.json")
    storage.atomic_write_json(uris["results_json"], {
        "settings": settings_digest(config), "scores": records, "conclusions": found, "verdict": sentence,
        "table": table.to_dict(orient="records")})
    return {"uris": uris, "verdict": sentence, "table_markdown": markdown_table(table),
            "conclusions_markdown": markdown_table(claims)}


def interval_rows(runs: dict[str, RunScores], seeds: list[int]) -> list[dict[str, Any]]:
    """Grounded minus plain per seed: every reported metric's mean paired difference over
    prompts (test-scene nouns for attention mIoU) with its 95% bootstrap interval."""
    reported = [row["metric"] for row in reports.paired_differences(runs, _pairs(seeds))]
    rows = reports.interval_rows(runs, _pairs(seeds), resamples=INTERVAL_RESAMPLES, seed=0)
    return sorted((row for row in rows if row["metric"] in reported), key=lambda row: reported.index(row["metric"]))


def conclusions(intervals: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Per metric: each seed's interval and the conclusion the seeds allow together:
    ``helped`` when every seed's interval lies above zero, ``hurt`` when every one lies
    below, else ``no conclusion``."""
    by_metric: dict[str, dict[str, dict[str, Any]]] = {}
    for row in intervals:
        by_metric.setdefault(row["metric"], {})[row["pair"]] = row
    found = []
    for metric, per_pair in by_metric.items():
        cells = [per_pair.get(f"seed {seed}") for seed in seeds]
        if any(cell is None for cell in cells):
            continue
        conclusion = ("helped" if all(c["low"] > 0 for c in cells) else
                      "hurt" if all(c["high"] < 0 for c in cells) else "no conclusion")
        found.append({"metric": metric, "per_seed": cells, "conclusion": conclusion})
    return found


def verdict(found: list[dict[str, Any]], seeds: list[int]) -> str:
    """The claim in one paragraph, as measured."""
    named = {kind: [f["metric"] for f in found if f["conclusion"] == kind] for kind in ("helped", "hurt", "no conclusion")}
    seeds_text = ", ".join(str(seed) for seed in seeds)
    parts = [f"Fine-tune seeds {seeds_text}, grounded minus plain, 95% paired bootstrap intervals over prompts:"]
    parts.append(f"grounding helped on {len(named['helped'])} of {len(found)} metrics"
                 + (f" ({', '.join(named['helped'])})" if named["helped"] else "")
                 + " (interval above zero in every seed).")
    if named["hurt"]:
        parts.append(f"It hurt on: {', '.join(named['hurt'])} (interval below zero in every seed).")
    if named["no conclusion"]:
        parts.append(f"No conclusion (an interval holds zero, or the seeds disagree) on: {', '.join(named['no conclusion'])}.")
    return " ".join(parts)


def conclusion_table(found: list[dict[str, Any]], seeds: list[int]) -> pd.DataFrame:
    """One row per metric: each seed's difference [95% interval], then the conclusion."""
    return pd.DataFrame([{"metric": f["metric"],
                          **{f"seed {seed}": f"{c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"
                             for seed, c in zip(seeds, f["per_seed"])},
                          "conclusion": f["conclusion"]} for f in found])


def _pairs(seeds: list[int]) -> dict[str, tuple[str, str]]:
    return {f"seed {seed}": (f"plain-s{seed}", f"grounded-s{seed}") for seed in seeds}


def results_table(scores: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model: MG_k mean ± std per group, attention mIoU."""
    rows = []
    for model, record in scores.items():
        row = {"model": model}
        for group, table in record["multigen"].items():
            for k in record["reported_ks"][group]:
                cell = table[f"MG{k}"]
                row[f"{group} MG{k}"] = f"{cell['mean']:.1f} ± {cell['std']:.1f}"
        overall = record["segmentation"]["overall"]
        row["attn mIoU"] = f"{overall['miou_fixed']:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot_loss_curves(runs: dict[str, str], uri: str) -> str:
    """Denoising loss of every model and grounding losses of the grounded ones (PNG)."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for model, output_uri in runs.items():
        lines = storage.read_bytes(storage.join(output_uri, "metrics.jsonl")).decode().splitlines()
        records = [json.loads(line) for line in lines if line]
        steps = np.array([r["step"] for r in records])
        window = max(1, len(records) // 40)
        smooth = lambda v: np.convolve(v, np.ones(window) / window, mode="valid")  # noqa: E731
        axes[0].plot(steps[window - 1:], smooth(np.array([r["denoise"] for r in records])), label=model)
        grounding = [k for k in records[-1] if k.startswith(("token/", "pixel/"))]
        for key in grounding:
            axes[1].plot(steps[window - 1:], smooth(np.array([r[key] for r in records])), label=f"{model} {key}")
    axes[0].set_title("denoising loss")
    axes[1].set_title("grounding losses (grounded fine-tunes)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend(fontsize=6)
    return save_figure(figure, uri)


def grid_image(index_uri: str, out_uri: str, prompts: int, images: int, scale: int = 4) -> str:
    """One PNG of ``prompts`` rows x ``images`` samples, upscaled (tiny images)."""
    index = storage.read_parquet(index_uri)
    rows = []
    for prompt_id in sorted(index["prompt_id"].unique())[:prompts]:
        chosen = index[(index["prompt_id"] == prompt_id) & (index["image_index"] < images)].sort_values("image_index")
        rows.append(np.concatenate([np.asarray(read_image(u)) for u in chosen["image_uri"]], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    storage.atomic_write_bytes(out_uri, synthetic.png_bytes(grid))
    return out_uri

