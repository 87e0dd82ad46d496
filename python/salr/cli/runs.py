"""Run directories of the ``salr`` CLI: config, metrics, a markdown report and plots.

Every subcommand writes one directory::

    <run>/config.json     the arguments and versions the run used
    <run>/metrics.json    the numbers it produced (rewritten as they arrive)
    <run>/report.md       the same numbers as tables a person reads
    <run>/*.png           plots (loss curve, perplexity per stage, speed, per-layer sparsity / rank)

Files are written to a temporary name in the same folder and renamed, so an interrupted run never
leaves a half-written file. An existing non-empty directory is refused unless ``overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

import salr
from salr.io.files import atomic_write, atomic_write_text, jsonable


def environment() -> dict[str, Any]:
    """What produced the numbers: versions, CPU path, threads."""
    return {"salr": salr.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_path": salr.cpu_isa(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class RunDirectory:
    """One run's output folder; metrics accumulate and are rewritten atomically on every update."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {self.path} exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise ValueError(f"run directory {self.path} already exists and is not empty; "
                             "pass --overwrite to replace its files, or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        target = self.file(name)
        atomic_write_text(target, json.dumps(jsonable(data), indent=2) + "\n")
        return target

    def write_config(self, config: dict[str, Any]) -> Path:
        return self.write_json("config.json", {"config": config, "environment": environment()})

    def update_metrics(self, **values: Any) -> None:
        self.metrics.update(values)
        self.write_json("metrics.json", self.metrics)

    def write_report(self, title: str, sections: Sequence[tuple[str, str]]) -> Path:
        """sections: (heading, markdown body) pairs."""
        lines = [f"# {title}", ""]
        for heading, body in sections:
            lines += [f"## {heading}", "", body.rstrip(), ""]
        target = self.file("report.md")
        atomic_write_text(target, "\n".join(lines))
        return target


def open_run(args: argparse.Namespace) -> RunDirectory:
    """The run directory of a CLI command (``--out``, ``--overwrite``, ``--resume``): a fresh run with
    --overwrite starts from an empty directory, so old checkpoints are never resumed by accident."""
    out = Path(args.out)
    if args.overwrite and out.is_dir() and not getattr(args, "resume", False):
        shutil.rmtree(out)
    return RunDirectory(out, overwrite=args.overwrite or getattr(args, "resume", False))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- plots (matplotlib is optional: without it a run simply has no pictures) -----------------

def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")


def plot_loss(run: RunDirectory, history: Sequence[dict[str, Any]], name: str = "loss.png") -> Path | None:
    plt = _pyplot()
    steps = [h["step"] for h in history if "loss" in h]
    if plt is None or not steps:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = _save(fig, run.file(name))
    plt.close(fig)
    return path


def plot_bars(run: RunDirectory, name: str, labels: Sequence[str], values: Sequence[float], ylabel: str,
              title: str = "") -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.2))
    colors = ["gray"] + ["tab:blue"] * (len(labels) - 1)
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = _save(fig, run.file(name))
    plt.close(fig)
    return path


def plot_per_layer(run: RunDirectory, name: str, layer_names: Sequence[str], series: dict[str, Sequence[float]],
                   title: str = "") -> Path | None:
    """One panel per series (e.g. sparsity, rank) over the layers, in model order."""
    plt = _pyplot()
    if plt is None or not layer_names:
        return None
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.2 * len(series)), squeeze=False, sharex=True)
    for ax, (label, values) in zip(axes[:, 0], series.items()):
        ax.plot(range(len(values)), values, marker=".", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("layer (model order)")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    path = _save(fig, run.file(name))
    plt.close(fig)
    return path
