"""Reports people can read: a comparison table of any number of runs as Markdown, an
HTML page with image grids and attention heat-map overlays, and PNG plots.

Inputs are plain data (:class:`RunScores`: MultiGen tables, mIoU dicts, sample index
URIs, overlay PNG URIs) or scores folders written by the evaluate stage, so the
pipeline and the synthetic demo produce their reports with the same code.
"""

from __future__ import annotations

import html
import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from tokencompose_core import outputs, storage
from tokencompose_core.intervals import PER_UNIT_COLUMNS, paired_intervals

_DIFFERENCES = "Paired differences (treated minus baseline, points)"
_INTERVALS = "Paired differences with 95% bootstrap intervals (treated minus baseline)"
_VISOR = "VISOR on SR2D (OA is the paper's Table 1 object accuracy)"
MG_KS = (2, 3, 4, 5)  # MG1 says little: one object of five
MG_ROWS = [f"MG{k}" for k in MG_KS]


@dataclass(frozen=True)
class Claim:
    """What a report answers, shown first: a heading, the answer in one sentence, the table it
    rests on and images (files beside the report, e.g. loss curves)."""

    title: str
    sentence: str
    table: pd.DataFrame | None = None
    images: tuple[str, ...] = ()


@dataclass
class RunScores:
    """Everything the report shows about one run (one model)."""

    multigen: dict[str, pd.DataFrame] = field(default_factory=dict)  # prompt set -> MG1..MG5 x mean/std
    two_object_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # prompt set -> mean/std
    miou: dict[str, Any] | None = None  # evaluation.segmentation_miou result
    images_per_s: float | None = None
    samples: dict[str, str] = field(default_factory=dict)  # prompt set -> sample index.parquet URI
    overlays: list[dict[str, Any]] = field(default_factory=list)  # {"title", "uri"}
    reported_ks: dict[str, list[int]] = field(default_factory=dict)  # table -> MG_k worth showing
    fid: dict[str, Any] | None = None  # fid.json
    clip: dict[str, Any] | None = None  # clip.json
    latency: dict[str, Any] | None = None  # seconds per image at the sampling steps and batch
    visor: dict[str, Any] | None = None  # visor.json: VISOR's metrics on SR2D
    # Per-prompt (per-noun for mIoU) values, what paired intervals resample.
    per_unit: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PER_UNIT_COLUMNS))


def multigen_record(model: str, prompt_set: str, table: pd.DataFrame, index_uri: str | None = None,
                    two_object_accuracy: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON the evaluate stage writes as scores/<tag>/multigen.json.

    Scores only: the sampling run's timings stay in its own ``stats.json`` (read by
    :func:`sampling_timing`), so a recomputed score file is byte-identical."""
    return {"model": model, "prompt_set": prompt_set, "scores": table.to_dict(orient="index"),
            "index_uri": index_uri, "two_object_accuracy": two_object_accuracy}


def sampling_timing(index_uri: str) -> tuple[float | None, dict[str, Any] | None]:
    """(images/s, latency) of the sampling run that wrote ``index_uri``, from its ``stats.json``.

    Latency is seconds per image as the paper gives it, with the steps and batch it was
    measured at (the sampling run's own clock: model loading left out).
    """
    samples_uri = posixpath.dirname(index_uri)
    stats_uri = storage.join(samples_uri, "stats.json")
    stats = storage.read_json(stats_uri) if storage.exists(stats_uri) else {}
    if not stats.get("images") or not stats.get("seconds"):
        return stats.get("images_per_s"), None
    sample = storage.read_json(storage.join(samples_uri, "sample_meta.json"))["sample"]
    latency = {"seconds_per_image": stats["seconds"] / stats["images"], "steps": sample["num_inference_steps"],
               "batch_size": stats.get("batch_size", sample["batch_size"])}
    return stats.get("images_per_s"), latency


def read_per_unit(scores_uri: str) -> pd.DataFrame:
    """Every per-unit table (``per_unit_*.parquet``) a scores folder holds, as one."""
    fs, path = storage.filesystem(scores_uri)
    tables = [storage.read_parquet(storage.join(scores_uri, posixpath.basename(found)))
              for found in sorted(fs.glob(posixpath.join(path, "per_unit_*.parquet")))]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=PER_UNIT_COLUMNS)


def load_run_scores(scores_uris: list[str]) -> RunScores:
    """One run's scores from its scores folders (multigen.json, optional segmentation.json)."""
    run = RunScores()
    for uri in scores_uris:
        record = storage.read_json(storage.join(uri, "multigen.json"))
        prompt_set = record["prompt_set"]
        # Scored by prompt groups (the demo's "3 objects", "unseen"...): those are the tables.
        for name, scores in (record.get("groups") or {prompt_set: record["scores"]}).items():
            run.multigen[name] = pd.DataFrame.from_dict(scores, orient="index")
        run.reported_ks.update(record.get("reported_ks", {}))
        # Scores written before the rename name it "object_accuracy".
        accuracy = record.get("two_object_accuracy") or record.get("object_accuracy")
        if accuracy:
            run.two_object_accuracy[prompt_set] = accuracy
        if record.get("index_uri"):
            run.samples[prompt_set] = record["index_uri"]
            images_per_s, latency = sampling_timing(record["index_uri"])
            run.images_per_s = images_per_s if images_per_s is not None else run.images_per_s
            run.latency = latency or run.latency
        for name in ("fid", "clip", "visor"):
            if storage.exists(storage.join(uri, f"{name}.json")):
                setattr(run, name, storage.read_json(storage.join(uri, f"{name}.json")))
        if run.visor is not None:  # VISOR's OA compares with the paper's only under VISOR's detector
            run.visor["detector"] = scored_with(uri)
        # Attention mIoU is the model's on the mask cache, whatever the prompts: each scores folder
        # of the run holds the same mIoU units, which count once (as run.miou, the last one read).
        run.per_unit = pd.concat([run.per_unit, read_per_unit(uri)], ignore_index=True).drop_duplicates(
            ["unit", "metric"], keep="last", ignore_index=True)
        segmentation_uri = storage.join(uri, "segmentation.json")
        if storage.exists(segmentation_uri):
            run.miou = storage.read_json(segmentation_uri)
            run.overlays = run.miou.get("overlays", [])
    return run


def scored_with(scores_uri: str) -> str | None:
    """The detector (and its weights) a sealed scores folder was scored with, from the
    ``config.yaml`` the stage leaves there; None for a folder without one."""
    uri = storage.join(scores_uri, outputs.CONFIG)
    if not storage.exists(uri):
        return None
    config = yaml.safe_load(storage.read_bytes(uri))
    detector = config["score"]["detector"]
    weights = config["models"].get(detector)  # models.owlv2 / models.owlvit; the synthetic one has none
    return f"{detector} ({weights})" if weights else detector


def _mean_std(cell: dict[str, float] | pd.Series | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def comparison_table(runs: dict[str, RunScores]) -> pd.DataFrame:
    """One row per run: MG2..MG5 (mean ± std) per prompt set, two-object accuracy, mIoU, images/s,
    FID, CLIP score and seconds per image at the sampling steps and batch."""
    prompt_sets = sorted({s for run in runs.values() for s in run.multigen})
    accuracy_sets = sorted({s for run in runs.values() for s in run.two_object_accuracy})
    rows = []
    for name, run in runs.items():
        row: dict[str, str] = {"run": name}
        for prompt_set in prompt_sets:
            table = run.multigen.get(prompt_set)
            for k in MG_ROWS:
                row[f"{prompt_set} {k}"] = _mean_std(table.loc[k] if table is not None else None)
        for prompt_set in accuracy_sets:
            row[f"{prompt_set} two-object acc."] = _mean_std(run.two_object_accuracy.get(prompt_set))
        overall = (run.miou or {}).get("overall")
        row["mIoU best"] = f"{overall['miou_best']:.2f}" if overall else "–"
        row["mIoU fixed"] = f"{overall['miou_fixed']:.2f}" if overall else "–"
        row["images/s"] = f"{run.images_per_s:.3f}" if run.images_per_s else "–"
        row["FID"] = f"{run.fid['fid']:.2f}" if run.fid and run.fid["fid"] is not None else "–"
        row["CLIP score"] = f"{run.clip['clip_score']:.2f}" if run.clip else "–"
        latency = run.latency
        row["s/image"] = (f"{latency['seconds_per_image']:.3f} ({latency['steps']} steps, batch {latency['batch_size']})"
                          if latency else "–")
        rows.append(row)
    return pd.DataFrame(rows)


def visor_table(runs: dict[str, RunScores]) -> pd.DataFrame | None:
    """VISOR's metrics of the runs scored on SR2D, beside the paper's OA; None when none was."""
    scored = {name: run.visor for name, run in runs.items() if run.visor}
    if not scored:
        return None
    from tokencompose_core.visor import report_table  # torch-backed module: only when needed

    return report_table(scored)


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _group_table(runs: dict[str, RunScores]) -> pd.DataFrame | None:
    """mIoU per supervised layer group (fixed / best threshold), one row per run."""
    rows = []
    for name, run in runs.items():
        if not run.miou:
            continue
        row = {"run": name}
        for group, scores in run.miou["groups"].items():
            row[group] = f"{scores['miou_fixed']:.1f} / {scores['miou_best']:.1f} (t={scores['best_threshold']})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–") if rows else None


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (workers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, uri: str) -> str:
    """Write ``figure`` as a PNG at ``uri`` atomically, then free it."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(figure)
    storage.atomic_write_bytes(uri, buffer.getvalue())
    return uri


def plot_multigen(runs: dict[str, RunScores], uri: str) -> str | None:
    """Bars of MG2..MG5 with std error bars, one panel per prompt set."""
    plt = pyplot()

    prompt_sets = sorted({s for run in runs.values() for s in run.multigen})
    if not prompt_sets:
        return None
    figure, axes = plt.subplots(1, len(prompt_sets), figsize=(5 * len(prompt_sets), 3.5), squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for ax, prompt_set in zip(axes[0], prompt_sets):
        for offset, (name, run) in enumerate(runs.items()):
            table = run.multigen.get(prompt_set)
            if table is None:
                continue
            xs = [i + offset * width for i in range(len(MG_ROWS))]
            ax.bar(xs, table.loc[MG_ROWS, "mean"], width, yerr=table.loc[MG_ROWS, "std"], label=name, capsize=2)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(MG_ROWS))], MG_ROWS)
        ax.set_title(f"MultiGen {prompt_set}")
        ax.set_ylabel("% of images")
        ax.legend(fontsize=7)
    return save_figure(figure, uri)


def plot_miou(runs: dict[str, RunScores], uri: str) -> str | None:
    """Bars of mIoU (best threshold) per layer group and overall, one bar per run."""
    plt = pyplot()

    scored = {name: run.miou for name, run in runs.items() if run.miou}
    if not scored:
        return None
    groups = sorted({g for m in scored.values() for g in m["groups"]}) + ["overall"]
    figure, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(scored)) / 2), 3.5))
    width = 0.8 / len(scored)
    for offset, (name, miou) in enumerate(scored.items()):
        values = [(miou["groups"].get(g) if g != "overall" else miou["overall"]) or {} for g in groups]
        ax.bar([i + offset * width for i in range(len(groups))], [v.get("miou_best", 0.0) for v in values],
               width, label=name)
    ax.set_xticks([i + width * (len(scored) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("mIoU (%) at best threshold")
    ax.set_title("Cross-attention segmentation")
    ax.legend(fontsize=7)
    return save_figure(figure, uri)


def _link(target: str, report_dir: str) -> str:
    """A src/href usable from the report: relative for local files, the URI otherwise."""
    fs, path = storage.filesystem(target)
    report_fs, report_path = storage.filesystem(report_dir)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local") and report_fs.protocol == fs.protocol:
        return os.path.relpath(path, report_path)
    return target


def _image_grid(index_uri: str, report_dir: str, prompts: int, images: int) -> str:
    index = storage.read_parquet(index_uri)
    keep = sorted(index["prompt_id"].unique())[:prompts]
    rows = []
    for prompt_id in keep:
        chosen = index[(index["prompt_id"] == prompt_id) & (index["image_index"] < images)].sort_values("image_index")
        cells = "".join(f'<img src="{html.escape(_link(u, report_dir))}" alt="">' for u in chosen["image_uri"])
        caption = html.escape(str(chosen["prompt"].iloc[0])) if len(chosen) else ""
        rows.append(f'<div class="row"><div class="prompt">{caption}</div>{cells}</div>')
    return "\n".join(rows)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}
.row{display:flex;align-items:center;gap:4px;margin:4px 0}.prompt{width:260px;font-size:12px}
.row img{width:128px;height:128px;image-rendering:pixelated}figure{display:inline-block;margin:6px}
figure img{height:128px;image-rendering:pixelated}figcaption{font-size:11px;max-width:400px}
img.plot{max-width:100%;height:auto}.wide{overflow-x:auto}"""


def paired_differences(runs: dict[str, RunScores], pairs: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Treated minus baseline, in points, for each pair (label -> (baseline run, treated
    run)) and each metric: MG_k of every MultiGen table (the k worth reporting) and
    attention mIoU at the fixed threshold when both runs have it."""
    first = runs[next(iter(pairs.values()))[0]]
    rows = []
    for name in first.multigen:
        for k in first.reported_ks.get(name, list(MG_KS)):
            per_pair = [float(runs[treated].multigen[name].loc[f"MG{k}", "mean"])
                        - float(runs[baseline].multigen[name].loc[f"MG{k}", "mean"]) for baseline, treated in pairs.values()]
            rows.append({"metric": f"{name} MG{k}", "per_pair": per_pair, "mean": float(sum(per_pair) / len(per_pair))})
    if all(runs[run].miou for pair in pairs.values() for run in pair):
        per_pair = [runs[treated].miou["overall"]["miou_fixed"] - runs[baseline].miou["overall"]["miou_fixed"]
                    for baseline, treated in pairs.values()]
        rows.append({"metric": "attention mIoU", "per_pair": per_pair, "mean": float(sum(per_pair) / len(per_pair))})
    return rows


def interval_rows(runs: dict[str, RunScores], pairs: dict[str, tuple[str, str]], resamples: int,
                  seed: int) -> list[dict[str, Any]]:
    """Every metric both runs of a pair have per-unit values for: the mean paired difference
    with its 95% bootstrap interval (:func:`tokencompose_core.intervals.paired_intervals`)."""
    rows = []
    for label, (baseline, treated) in pairs.items():
        for row in paired_intervals(runs[baseline].per_unit, runs[treated].per_unit, resamples, seed):
            rows.append({"pair": label, **row})
    return rows


def interval_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`interval_rows` as text: difference [low, high] and the number of paired units."""
    return pd.DataFrame([{"pair": r["pair"], "metric": r["metric"], "difference": f"{r['difference']:+.2f}",
                          "95% interval": f"[{r['low']:+.2f}, {r['high']:+.2f}]", "units": r["units"]}
                         for r in rows])


def plot_intervals(rows: list[dict[str, Any]], uri: str) -> str | None:
    """Paired differences as points with their 95% intervals as error bars, one line per metric."""
    if not rows:
        return None
    plt = pyplot()
    labels = [f"{r['pair']}: {r['metric']}" for r in rows]
    figure, ax = plt.subplots(figsize=(7.0, 0.3 * len(rows) + 1.2))
    centres = [r["difference"] for r in rows]
    errors = [[r["difference"] - r["low"] for r in rows], [r["high"] - r["difference"] for r in rows]]
    ax.errorbar(centres, range(len(rows)), xerr=errors, fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("treated minus baseline (95% bootstrap interval)")
    return save_figure(figure, uri)


def difference_table(differences: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    """:func:`paired_differences` as a table: one column per pair, then the mean."""
    return pd.DataFrame([{"metric": d["metric"], **{label: f"{v:+.1f}" for label, v in zip(labels, d["per_pair"])},
                          "mean": f"{d['mean']:+.1f}"} for d in differences])


def _html_page(title: str, table: pd.DataFrame, groups: pd.DataFrame | None, plots: list[str],
               runs: dict[str, RunScores], report_dir: str, grid: tuple[int, int],
               differences: pd.DataFrame | None, intervals: pd.DataFrame | None,
               visor: pd.DataFrame | None, claim: Claim | None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if claim is not None:
        parts += [f"<h2>{html.escape(claim.title)}</h2>", f"<p><b>{html.escape(claim.sentence)}</b></p>"]
        if claim.table is not None:
            parts.append(claim.table.to_html(index=False, escape=True))
        parts += [f'<p><img class="plot" src="{html.escape(_link(uri, report_dir))}" alt="{html.escape(claim.title)}">'
                  "</p>" for uri in claim.images]
    if intervals is not None:
        parts += [f"<h2>{_INTERVALS}</h2>", intervals.to_html(index=False, escape=True)]
    if differences is not None:
        parts += [f"<h2>{_DIFFERENCES}</h2>", differences.to_html(index=False, escape=True)]
    parts += ["<h2>Comparison</h2>", f'<div class="wide">{table.to_html(index=False, escape=True)}</div>']
    if visor is not None:
        parts += [f"<h2>{_VISOR}</h2>", visor.to_html(index=False, escape=True)]
    if groups is not None:
        parts += ["<h3>mIoU per layer group (fixed / best threshold)</h3>", groups.to_html(index=False)]
    parts += [f'<p><img class="plot" src="{html.escape(_link(p, report_dir))}" alt="plot"></p>' for p in plots]
    for name, run in runs.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        for prompt_set, index_uri in sorted(run.samples.items()):
            parts += [f"<h3>Samples: {html.escape(prompt_set)}</h3>", _image_grid(index_uri, report_dir, *grid)]
        if run.overlays:
            parts.append("<h3>Cross-attention per noun (image · heat map · mask)</h3>")
            parts += [f'<figure><img src="{html.escape(_link(o["uri"], report_dir))}" alt="">'
                      f'<figcaption>{html.escape(o["title"])}</figcaption></figure>' for o in run.overlays]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(runs: dict[str, RunScores | str | list[str]], out_uri: str, title: str = "TokenCompose report",
                 grid_prompts: int = 4, grid_images: int = 4,
                 pairs: dict[str, tuple[str, str]] | None = None, resamples: int = 2000,
                 seed: int = 0, claim: Claim | None = None) -> dict[str, str]:
    """Write report.md, report.html and PNG plots under ``out_uri``; returns their URIs
    (keys ``md``, ``html``, ``png_multigen``, ``png_miou`` when there is mIoU,
    ``png_intervals`` when there are paired intervals).

    ``runs`` maps a run name to its :class:`RunScores` or to scores folder URI(s).
    ``pairs`` (label -> (baseline run, treated run)) adds, first, every metric's paired
    difference with its 95% bootstrap interval (``resamples``, ``seed``) where both runs
    have per-unit values, and the differences of each pair side by side. ``claim``, the
    answer the report gives, comes before everything else.
    """
    loaded = {name: run if isinstance(run, RunScores) else load_run_scores([run] if isinstance(run, str) else run)
              for name, run in runs.items()}
    differences = difference_table(paired_differences(loaded, pairs), list(pairs)) if pairs else None
    intervals = interval_rows(loaded, pairs, resamples, seed) if pairs else []
    table = comparison_table(loaded)
    groups, visor = _group_table(loaded), visor_table(loaded)
    uris: dict[str, str] = {}
    written = plot_intervals(intervals, storage.join(out_uri, "intervals.png"))
    if written:
        uris["png_intervals"] = written
    for key, plot in (("png_multigen", plot_multigen), ("png_miou", plot_miou)):
        written = plot(loaded, storage.join(out_uri, f"{key[4:]}.png"))
        if written:
            uris[key] = written
    markdown = [f"# {title}", ""]
    if claim is not None:
        markdown += [f"## {claim.title}", "", f"**{claim.sentence}**", ""]
        if claim.table is not None:
            markdown += [markdown_table(claim.table), ""]
        markdown += [f"![{claim.title}]({os.path.basename(uri)})" for uri in claim.images] + [""]
    if intervals:
        markdown += [f"## {_INTERVALS}", "", markdown_table(interval_table(intervals)), ""]
    if differences is not None:
        markdown += [f"## {_DIFFERENCES}", "", markdown_table(differences), ""]
    markdown += [markdown_table(table), ""]
    if visor is not None:
        markdown += [f"## {_VISOR}", "", markdown_table(visor), ""]
    if groups is not None:
        markdown += ["## mIoU per layer group (fixed / best threshold)", "", markdown_table(groups), ""]
    markdown += [f"![{key}]({os.path.basename(uri)})" for key, uri in uris.items()]
    uris["md"] = storage.join(out_uri, "report.md")
    storage.atomic_write_bytes(uris["md"], ("\n".join(markdown) + "\n").encode("utf-8"))
    page = _html_page(title, table, groups,
                      [uris[k] for k in ("png_intervals", "png_multigen", "png_miou") if k in uris],
                      loaded, out_uri, (grid_prompts, grid_images), differences,
                      interval_table(intervals) if intervals else None, visor, claim)
    uris["html"] = storage.join(out_uri, "report.html")
    storage.atomic_write_bytes(uris["html"], page.encode("utf-8"))
    return uris
