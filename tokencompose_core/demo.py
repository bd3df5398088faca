"""The embedded demo's library steps: does token-level grounding help composition?

The experiment (flows/demo.py runs each step as a cached Prefect task):

1. :func:`build_world` writes the synthetic world (tokencompose_core.synthetic) as a
   manifest, nouns table and exact-mask cache, a held-out test split with masks,
   and MultiGen-style test prompts.
2. :func:`train_model` pre-trains the base model (denoising only) with the real
   stage-3 code, then fine-tunes it per seed twice for the same steps, data order
   and noise: ``plain`` (denoising only) and ``grounded`` (+ token and pixel losses).
3. :func:`sample_model` samples every model with the real stage-4 code from the
   same initial noise (paired), :func:`score_model` runs stage 5's steps
   (tokencompose_core.scoring) with the world's detector as the detector plug-in:
   MG2..MG5 per prompt group and attention-map mIoU.
4. :func:`write_results` writes stage 5's report with its paired-difference section
   (grounded minus plain per seed), the verdict, image grids, attention overlays and
   loss curves as Markdown/HTML/PNG.

Every step writes under ``config.storage.root`` and returns small JSON-able dicts.
"""

from __future__ import annotations

import html
import json
import posixpath
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pandas as pd

from tokencompose_core import reports, storage, synthetic
from tokencompose_core.stages import score as scoring
from tokencompose_core.config import GroundingLayersConfig, PipelineConfig, TrainConfig, WorldConfig, load_config
from tokencompose_core.identity import value_hash
from tokencompose_core.evaluation import read_image
from tokencompose_core.reports import RunScores, markdown_table, pyplot, save_figure
from tokencompose_core.sampling import Prompt, sample

PROFILES = {False: "demo", True: "demo-quick"}
TEST_PROMPTS = "test prompts"  # the prompt set's name in the scores and the report
INTERVAL_RESAMPLES = 10_000


def load_demo_config(quick: bool = False, out: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The demo profile (``configs/demo.yaml`` or ``demo-quick.yaml``) with ``overrides``, rooted at ``out``."""
    config = load_config(PROFILES[quick], overrides)
    if out:
        config.storage.root = out
    return config


def model_names(config: PipelineConfig) -> list[str]:
    """``base``, then ``plain-s<seed>`` and ``grounded-s<seed>`` per fine-tune seed."""
    names = ["base"]
    for seed in config.demo.finetune_seeds:
        names += [f"plain-s{seed}", f"grounded-s{seed}"]
    return names


def _root(config: PipelineConfig, *parts: str) -> str:
    return storage.join(config.storage.root, *parts)


def _digest(value: Any) -> str:
    return value_hash(value, 10)


def world_path(config: PipelineConfig) -> str:
    demo = config.demo
    spec = [demo.world.model_dump(mode="json"), demo.test_images, demo.prompt_object_counts, demo.prompts_per_count,
            demo.base.max_objects]
    return _root(config, f"world-{_digest(spec)}")


def pretrain_world(config: PipelineConfig) -> WorldConfig | None:
    """The world the base model pre-trains on when ``demo.base.max_objects`` limits it:
    the same categories and seed, scenes of at most that many objects."""
    limit, world = config.demo.base.max_objects, config.demo.world
    if limit is None or limit >= world.max_objects:
        return None
    return world.model_copy(update={"max_objects": limit, "min_objects": min(world.min_objects, limit)})


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run with exactly ``threads`` torch threads: the thread count decides the order of
    float reductions, so pinning it makes a step's result independent of the machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_digest(config: PipelineConfig, model: str) -> str:
    """What determines a model's weights: its train settings, the model profile, the
    world, and for a fine-tune the base model's digest."""
    phase = config.demo.base if model == "base" else config.demo.finetune
    payload = {"train": phase_config(config, model).train.model_dump(mode="json"),
               "phase": phase.model_dump(mode="json"),
               "models": config.models.model_dump(mode="json", exclude={"cache_dir"}),
               "world": config.demo.world.model_dump(mode="json"),
               "init": model_digest(config, "base") if model != "base" else None}
    return _digest(payload)


def model_paths(config: PipelineConfig, model: str) -> dict[str, str]:
    """Where a model's run (and its final ``unet``), samples and scores go. Folder names
    carry digests of what made them, so a changed setting never resumes or reuses a
    stale folder. Known before training, so later steps can be queued at once."""
    run = f"{model}-{model_digest(config, model)}"
    sampled = [config.sample.model_dump(mode="json"), world_path(config)]
    # Attention mIoU reads the maps of the supervised layer groups (train.grounding).
    scored = sampled + [config.score.model_dump(mode="json"), config.train.grounding.model_dump(mode="json")]
    train = _root(config, "train", run)
    return {"train": train, "unet": storage.join(train, "unet"), "samples": _root(config, "samples", f"{run}-{_digest(sampled)}"),
            "scores": _root(config, "scores", f"{run}-{_digest(scored)}")}


# ----------------------------------------------------------------------------- 1. the world


def build_world(config: PipelineConfig) -> dict[str, Any]:
    """Write the training split, the test split (attention mIoU) and the test prompts."""
    from tokencompose_core.models import clip_tokenizer

    demo = config.demo
    world_uri = world_path(config)
    fingerprint = synthetic.world_fingerprint(demo.world)
    tokenizer = clip_tokenizer()
    train = synthetic.write_split(synthetic.train_samples(demo.world), world_uri, "train", tokenizer, fingerprint)
    test = synthetic.write_split(synthetic.test_samples(demo.world, demo.test_images), world_uri, "test",
                                 tokenizer, fingerprint)
    limited = pretrain_world(config)
    pretrain = None if limited is None else synthetic.write_split(
        synthetic.train_samples(limited), world_uri, "pretrain", tokenizer, synthetic.world_fingerprint(limited))
    prompts = synthetic.test_prompts(demo.world, demo.prompt_object_counts, demo.prompts_per_count)
    prompts_uri = storage.join(world_uri, "prompts.json")
    storage.atomic_write_json(prompts_uri, [
        {"prompt_id": p.prompt_id, "text": p.text, "categories": list(p.categories), "heldout": p.heldout}
        for p in prompts])
    return {"train": train, "test": test, "pretrain": pretrain or train, "prompts_uri": prompts_uri,
            "heldout_combinations": [list(c) for c in synthetic.heldout_combinations(demo.world)]}


def read_prompts(prompts_uri: str) -> list[dict[str, Any]]:
    return storage.read_json(prompts_uri)


def _sampling_prompts(records: list[dict[str, Any]]) -> list[Prompt]:
    return [Prompt(r["prompt_id"], r["text"], tuple(r["categories"])) for r in records]


# ----------------------------------------------------------------------------- 2. training


def phase_config(config: PipelineConfig, model: str) -> PipelineConfig:
    """The train settings of one model: base pre-training or a fine-tune of one seed."""
    demo = config.demo
    cfg = config.model_copy(deep=True)
    train = cfg.train
    # The demo scores attention on its own test split, so no training image is held out.
    train.exclude_heldout = False
    phase = demo.base if model == "base" else demo.finetune
    train.max_steps, train.learning_rate = phase.steps, phase.learning_rate
    train.batch_size = phase.batch_size or train.batch_size
    if model == "base":
        _without_grounding(train)
        train.seed = 0
        return cfg
    kind, seed = model.split("-s")
    # Same seed => same data order, timesteps and noise: the two fine-tunes differ only in the loss.
    train.seed = int(seed)
    if kind == "plain":
        _without_grounding(train)
    return cfg


def _without_grounding(train: TrainConfig) -> None:
    """No grounding loss, and the grounding settings at their defaults: they have no effect
    then, so a grounding ablation keeps the base and plain models' folders (and caches)."""
    train.token_loss_weight = train.pixel_loss_weight = 0.0
    train.grounding = GroundingLayersConfig()


def train_model(config: PipelineConfig, model: str, cache_uri: str, init_unet: str | None) -> dict[str, Any]:
    """Train ``model`` (see :func:`phase_config`) into ``<root>/train/<model>``."""
    from tokencompose_core.models import resolve_diffusion_dir
    from tokencompose_core.train import train

    cfg = phase_config(config, model)
    threads = config.demo.base_threads if model == "base" else config.demo.task_threads
    with pinned_threads(threads):
        result = train(cfg.train, cfg.models, cache_uri, model_paths(config, model)["train"], init_unet=init_unet,
                       model_dir=resolve_diffusion_dir(config.models))
    return {"model": model, "output_uri": result.output_uri, "unet_uri": result.unet_uri,
            "global_step": result.global_step, "final_losses": result.final_losses}


# ----------------------------------------------------------------------------- 3. sampling and scoring


def sample_model(config: PipelineConfig, model: str, unet_uri: str, prompts_uri: str) -> str:
    """Sample every test prompt; the per-image seeds depend only on (prompt, index),
    so all models start from the same noise. Returns the sample index URI."""
    from tokencompose_core.models import resolve_diffusion_dir

    prompts = _sampling_prompts(read_prompts(prompts_uri))
    with pinned_threads(config.demo.task_threads):
        return sample(config.sample, config.models, resolve_diffusion_dir(config.models),
                      model_paths(config, model)["samples"], prompts, unet_dir=unet_uri)


def prompt_groups(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Prompt ids per reported group: ``<k> objects`` for each size, and ``unseen``
    (combinations never seen whole in training)."""
    groups: dict[str, list[int]] = {}
    for record in records:
        groups.setdefault(f"{len(record['categories'])} objects", []).append(record["prompt_id"])
    unseen = [r["prompt_id"] for r in records if r["heldout"]]
    if unseen:
        groups["unseen"] = unseen
    return groups


def multigen_by_group(detections: pd.DataFrame, index: pd.DataFrame, records: list[dict[str, Any]],
                      threshold: float) -> dict[str, dict[str, dict[str, float]]]:
    """MG1..MG5 (mean/std over image indices) per prompt group, by stage 5's scorer."""
    return scoring.multigen_by_group(detections, index, _sampling_prompts(records), prompt_groups(records), threshold)


def reported_ks(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """MG_k reported per group: MG_k above the group's largest prompt is 0 by construction."""
    prompts = {p.prompt_id: p for p in _sampling_prompts(records)}
    return {group: scoring.reported_ks([prompts[i] for i in ids]) for group, ids in prompt_groups(records).items()}


def score_model(config: PipelineConfig, model: str, index_uri: str, unet_uri: str, test_cache_uri: str,
                prompts_uri: str) -> str:
    """Stage 5's steps on one model (the world's detector, MultiGen per prompt group,
    attention mIoU on the test split) -> ``<scores>/scores.json``, the demo's summary."""
    from tokencompose_core.models import resolve_diffusion_dir

    out_uri, score = model_paths(config, model)["scores"], config.score
    records = read_prompts(prompts_uri)
    prompts = _sampling_prompts(records)
    detections_uri = scoring.detect(index_uri, prompts, config.models, score, out_uri, score.detector_batch_size)
    multigen = storage.read_json(scoring.score_multigen(
        detections_uri, index_uri, prompts, TEST_PROMPTS, score.detection_threshold, out_uri, model,
        prompt_groups(records)))
    with pinned_threads(config.demo.task_threads):
        segmentation = storage.read_json(scoring.score_segmentation(
            config.score, config.sample, config.train.grounding, config.models, resolve_diffusion_dir(config.models),
            unet_uri, test_cache_uri, out_uri))
    scores_uri = storage.join(out_uri, "scores.json")
    storage.atomic_write_json(scores_uri, {"model": model, "index_uri": index_uri, "detections_uri": detections_uri,
                                           "multigen": multigen["groups"], "reported_ks": multigen["reported_ks"],
                                           "segmentation": segmentation})
    return scores_uri


# ----------------------------------------------------------------------------- 4. results


def interval_rows(scores: dict[str, dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Grounded minus plain per seed: every reported metric's mean paired difference over
    prompts (test-scene nouns for attention mIoU) with its 95% bootstrap interval."""
    runs = {model: _run_scores(record) for model, record in scores.items()}
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


def _run_scores(record: dict[str, Any]) -> RunScores:
    return RunScores(
        multigen={group: pd.DataFrame.from_dict(table, orient="index") for group, table in record["multigen"].items()},
        miou=record["segmentation"], samples={TEST_PROMPTS: record["index_uri"]} if "index_uri" in record else {},
        overlays=record["segmentation"].get("overlays", []), reported_ks=record["reported_ks"],
        # Per-prompt values beside the detections: the report's paired intervals resample them.
        **({"per_unit": reports.read_per_unit(posixpath.dirname(record["detections_uri"]))}
           if "detections_uri" in record else {}))


def _add_verdict_to_html(html_uri: str, sentence: str) -> None:
    """Put the answer first on the shared report page (the paired differences follow it)."""
    page = storage.read_bytes(html_uri).decode("utf-8")
    section = (f"<h2>Did grounding help?</h2><p><b>{html.escape(sentence)}</b></p>"
               '<p><img src="loss_curves.png" alt="loss curves"></p>')
    head, sep, rest = page.partition("</h1>")
    storage.atomic_write_bytes(html_uri, (head + sep + section + rest).encode("utf-8"))


def write_results(config: PipelineConfig, scores_uris: dict[str, str], train_uris: dict[str, str]) -> dict[str, Any]:
    """The comparison: report.md/html with grids and overlays (shared report code),
    the per-seed intervals and their conclusion, loss curves, and ``results.json`` /
    ``results.md`` (which record the settings they answer for: :func:`results_current`)."""
    out_uri = _root(config, "reports")
    scores = {model: storage.read_json(uri) for model, uri in scores_uris.items()}
    seeds = list(config.demo.finetune_seeds)
    uris = reports.write_report({m: _run_scores(r) for m, r in scores.items()}, out_uri,
                                title="TokenCompose demo: synthetic world", grid_prompts=6, grid_images=8,
                                pairs=_pairs(seeds), resamples=INTERVAL_RESAMPLES)
    uris["png_loss_curves"] = plot_loss_curves(train_uris, storage.join(out_uri, "loss_curves.png"))
    for model, record in scores.items():
        uris[f"png_grid_{model}"] = grid_image(record["index_uri"], storage.join(out_uri, f"grid_{model}.png"),
                                               prompts=8, images=config.sample.images_per_prompt)
    found = conclusions(interval_rows(scores, seeds), seeds)
    table, claims = results_table(scores), conclusion_table(found, seeds)
    sentence = verdict(found, seeds)
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
    _add_verdict_to_html(uris["html"], sentence)
    uris["results_md"] = storage.join(out_uri, "results.md")
    storage.atomic_write_bytes(uris["results_md"], markdown.encode("utf-8"))
    uris["results_json"] = storage.join(out_uri, "results.json")
    storage.atomic_write_json(uris["results_json"], {
        "settings": settings_digest(config), "scores": scores, "conclusions": found, "verdict": sentence,
        "table": table.to_dict(orient="records")})
    return {"uris": uris, "verdict": sentence, "table_markdown": markdown_table(table),
            "conclusions_markdown": markdown_table(claims)}


def settings_digest(config: PipelineConfig) -> str:
    return _digest(config.model_dump(mode="json"))


def results_current(config: PipelineConfig) -> bool:
    """Whether ``reports/`` answers for exactly these settings: one reports folder serves
    a root, so after a run with other settings it holds theirs."""
    uri = _root(config, "reports", "results.json")
    try:
        return storage.exists(uri) and storage.read_json(uri).get("settings") == settings_digest(config)
    except (ValueError, UnicodeDecodeError):
        return False


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

