"""Per-layer numbers a report can show that actually differ between layers, and the bytes one decoded
token streams.

* :func:`reconstruction_errors`: ||W - W_s|| / ||W|| of every converted layer's pruned base W_s, and
  the same with its SVD residual adapter added (W_s + B_svd·A_svd), against the dense model's W.
* :func:`decode_bytes`: the bytes of the weights a decode step reads once per token (every decoder-block
  linear with its adapters, and the lm_head), counted from the model's tensors as they are held. Dense
  bytes / salr bytes is the most a memory-bound decode can gain (the byte limit).
* :func:`plot_layer_errors`: the errors over the layers, one colour per projection type, and the
  sparsity / adapter-rank panel only where those vary (LoSA, OWL); a constant line says nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from salr.cli.machine import speed_context_line
from salr.cli.runs import _pyplot, _save, markdown_table
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import salr_layers
from salr.nn.models import find_blocks, is_linear, weight_view


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def _relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    return (torch.linalg.norm(ref - approx.double()) / torch.linalg.norm(ref).clamp_min(1e-300)).item()


@torch.no_grad()
def reconstruction_errors(dense: nn.Module, converted: nn.Module) -> list[dict[str, Any]]:
    """Per converted layer, in model order: name, block index, projection kind, ``pruned_error``
    (||W - W_s||/||W||) and ``adapted_error`` (||W - (W_s + B_svd·A_svd)||/||W||; equal to the former
    without an SVD adapter). `dense` is an unconverted copy holding the original W at the same names."""
    path, _ = find_blocks(converted)
    rows = []
    for name, layer in salr_layers(converted).items():
        original = dense.get_submodule(name)
        if not is_linear(original):
            raise ValueError(f"reconstruction_errors: dense.{name} is a {type(original).__name__}, not the "
                             f"original linear of the converted layer")
        w = weight_view(original)
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"reconstruction_errors: dense.{name} has shape {tuple(w.shape)}, the converted layer "
                             f"{(layer.out_features, layer.in_features)}")
        base = layer.base_dense().double()
        if layer.svd_a is None:
            adapted = base
        else:
            svd_a, svd_b = layer.svd_factors()  # an int8 adapter dequantized
            adapted = base + svd_b.double() @ svd_a.double()
        block = name[len(path) + 1:].split(".", 1)[0] if name.startswith(path + ".") else ""
        rows.append({"layer": name, "block": int(block) if block.isdigit() else None,
                     "kind": name.rsplit(".", 1)[-1], "pruned_error": _relative_error(w, base),
                     "adapted_error": _relative_error(w, adapted)})
    return rows


def _module_bytes(module: nn.Module) -> tuple[int, int]:
    """(base bytes, adapter bytes) of one linear as held: a SALRLinear's BM8x8 base + bias and its
    adapters (SVD, LoRA, SALOR's stored factors), or a dense linear's weight + bias."""
    if isinstance(module, SALRLinear):
        base = _bytes(module.bitmap, module.values, module.offsets, module.scales, module.bias)
        return base, module.compressed_bytes() - base
    return _bytes(module.weight, getattr(module, "bias", None)), 0


def decode_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes read per decoded token: ``block_linears`` (bases), ``adapters``, ``lm_head`` and ``total``.
    Embedding lookups (one row), norms and the KV cache are left out; a tied lm_head counts once."""
    _, blocks = find_blocks(model)
    base = adapters = 0
    for module in blocks.modules():
        if isinstance(module, SALRLinear) or is_linear(module):
            b, a = _module_bytes(module)
            base, adapters = base + b, adapters + a
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"decode_bytes: {type(model).__name__} has no output embeddings (lm_head)")
    head_bytes = sum(_module_bytes(head))
    return {"block_linears": base, "adapters": adapters, "lm_head": head_bytes,
            "total": base + adapters + head_bytes}


def byte_limit(dense: nn.Module, sparse: nn.Module) -> dict[str, Any]:
    """Both models' bytes per decoded token and their ratio: the decode speed-up a purely
    memory-bound step could reach at best."""
    dense_bytes, sparse_bytes = decode_bytes(dense), decode_bytes(sparse)
    return {"dense": dense_bytes, "salr": sparse_bytes, "limit": dense_bytes["total"] / sparse_bytes["total"]}


def decode_summary(dense_tps: float, sparse_tps: float, limit: dict[str, Any],
                   context: dict[str, Any]) -> dict[str, Any]:
    """The decode figures with what they were measured on (salr.machine.speed_context) and the byte
    limit (:func:`byte_limit`), for metrics.json."""
    speedup = sparse_tps / dense_tps
    return {**context, "dense_tokens_per_s": dense_tps, "salr_tokens_per_s": sparse_tps, "speedup": speedup,
            "bytes_per_token": {"dense": limit["dense"], "salr": limit["salr"]}, "byte_limit": limit["limit"],
            "speedup_over_limit": speedup / limit["limit"]}


def decode_markdown(decode: dict[str, Any]) -> str:
    """The bytes-per-token table and the measured ratio beside its limit, for report.md."""
    dense, sparse = decode["bytes_per_token"]["dense"], decode["bytes_per_token"]["salr"]
    rows = [(what, dense[key] / 1e6, sparse[key] / 1e6) for what, key in
            (("decoder-block linears", "block_linears"), ("adapters", "adapters"), ("lm_head", "lm_head"),
             ("total", "total"))]
    return (markdown_table(["read per decoded token", "dense MB", "salr MB"], rows) + "\n\n"
            f"Measured decode ratio salr/dense {decode['speedup']:.2f}x; byte limit (dense bytes / salr bytes) "
            f"{decode['byte_limit']:.2f}x; measured / limit {decode['speedup_over_limit']:.2f}. "
            f"Measured as {speed_context_line(decode)}.")


# ---- plot --------------------------------------------------------------------------------------

def layer_plot_series(errors: Sequence[dict[str, Any]], layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What :func:`plot_layer_errors` draws: ``pruned_error`` and ``adapted_error`` as {kind: [(x, error)]}
    (x = position in model order), plus ``sparsity`` / ``adapter rank`` lists only when they vary."""
    series: dict[str, Any] = {}
    for key in ("pruned_error", "adapted_error"):
        by_kind: dict[str, list] = {}
        for x, row in enumerate(errors):
            by_kind.setdefault(row["kind"], []).append((x, row[key]))
        series[key] = by_kind
    for label, values in (("sparsity", [r["sparsity"] for r in layers]),
                          ("adapter rank", [r["svd_rank"] + r["lora_rank"] for r in layers])):
        if len(set(values)) > 1:
            series[label] = values
    return series


def plot_layer_errors(run, name: str, errors: Sequence[dict[str, Any]], layers: Sequence[dict[str, Any]]):
    """`errors` from :func:`reconstruction_errors`, `layers` from workflow.layer_table (same order).
    Returns the path, or None without matplotlib or layers."""
    plt = _pyplot()
    if plt is None or not errors:
        return None
    series = layer_plot_series(errors, layers)
    extra = [(label, series[label]) for label in ("sparsity", "adapter rank") if label in series]
    fig, axes = plt.subplots(1 + len(extra), 1, figsize=(9, 3.4 + 1.8 * len(extra)), squeeze=False, sharex=True)
    ax = axes[0, 0]
    colors = plt.get_cmap("tab10")
    for i, kind in enumerate(series["pruned_error"]):
        for key, marker, label in (("pruned_error", "o", kind), ("adapted_error", "x", None)):
            xs, ys = zip(*series[key][kind])
            ax.plot(xs, ys, ls="none", marker=marker, ms=3.5, color=colors(i % 10), label=label)
    ax.set_ylabel("||W - W'|| / ||W||")
    ax.set_title("per-layer relative error: o pruned W_s, x with SVD adapter W_s + B·A")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    for panel, (label, values) in zip(axes[1:, 0], extra):
        panel.plot(range(len(values)), values, marker=".", lw=1)
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
    starts = {r["block"]: x for x, r in reversed(list(enumerate(errors))) if r["block"] is not None}
    if starts:  # tick the first layer of every k-th block so the x axis reads as block numbers
        step = max(1, len(starts) // 12)
        ticks = sorted(starts.items())[::step]
        axes[-1, 0].set_xticks([x for _, x in ticks], [str(b) for b, _ in ticks])
    axes[-1, 0].set_xlabel("decoder block (layers in model order)")
    fig.tight_layout()
    path = _save(fig, run.file(name))
    plt.close(fig)
    return path
