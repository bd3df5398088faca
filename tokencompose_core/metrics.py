"""Training metrics: one JSON line per optimizer step, the loss curve, TensorBoard."""

from __future__ import annotations

import json

import numpy as np

from tokencompose_core import storage


class MetricsLog:
    """Per-step records kept in memory and republished atomically as JSON lines."""

    def __init__(self, uri: str, resume_step: int) -> None:
        self.uri = uri
        self.records: list[dict] = []
        if resume_step and storage.exists(uri):
            lines = storage.read_bytes(uri).decode("utf-8").splitlines()
            # Steps after the checkpoint are redone, so their old records go.
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]

    def append(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in self.records)
        storage.atomic_write_bytes(self.uri, text.encode("utf-8"))

    def final_losses(self, last: int = 10) -> dict[str, float]:
        tail = self.records[-last:]
        if not tail:
            return {}
        keys = [key for key in tail[-1] if key == "loss" or key.startswith(("denoise", "token/", "pixel/"))]
        return {key: float(np.mean([r[key] for r in tail if key in r])) for key in keys}


def plot_loss_curve(records: list[dict], uri: str) -> None:
    """Denoising, token and pixel losses against the step, smoothed, as a PNG."""
    from tokencompose_core.reports import pyplot, save_figure

    plt = pyplot()

    steps = np.array([r["step"] for r in records])
    keys = [k for k in records[-1] if k.startswith(("denoise", "token/", "pixel/"))]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    window = max(1, len(records) // 50)
    for axis, prefix in zip(axes, ("denoise", "token/", "pixel/")):
        for key in (k for k in keys if k.startswith(prefix)):
            values = np.array([r.get(key, np.nan) for r in records], dtype=float)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1 :], smooth, label=key)
        axis.set_title(prefix.rstrip("/") + " loss")
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
    save_figure(figure, uri)


def tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra
        return None
    return SummaryWriter(log_dir)
