"""Evaluate a salr model with EleutherAI's lm-evaluation-harness (optional: ``pip install 'salr[eval]'``).

A converted model is still a Hugging Face ``*ForCausalLM`` whose decoder linears are SALRLinear
modules, so lm-eval's own ``HFLM`` drives it unchanged: this module only hands it the live model
(no reload, no dense copy) and turns the harness's result dictionary into plain numbers.

    from salr.eval import lm_eval
    scores = lm_eval.evaluate_tasks(model, tokenizer, ["arc_easy"], limit=100)

The harness downloads task data from the Hugging Face Hub unless a task is local: ``task_dir``
points at a folder of task YAML files (e.g. ``dataset_path: json`` with local ``data_files``),
which is how the tests run it offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from salr.nn.models import model_device

INSTALL_HINT = "pip install 'salr[eval]' (or: pip install lm-eval)"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ModuleNotFoundError(f"lm-eval is not installed ({exc}); {INSTALL_HINT}") from exc
    return lm_eval, HFLM, TaskManager


def available() -> bool:
    """True when lm-eval can be imported."""
    try:
        _import_lm_eval()
    except ModuleNotFoundError:
        return False
    return True


def lm_eval_model(model: nn.Module, tokenizer: Any, *, batch_size: int = 1, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory (salr-converted or dense) causal LM."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model: expected a Hugging Face causal LM (an nn.Module with .config), got {type(model).__name__}")
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("tokenizer: expected a Hugging Face tokenizer (with .encode)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length: expected an integer >= 2 or None, got {max_length!r}")
    _, HFLM, _ = _import_lm_eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                device=str(model_device(model)))


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [str(t).strip() for t in tasks]
    if not tasks or any(not t for t in tasks):
        raise ValueError(f"tasks: expected one or more task names, got {tasks!r}")
    return tasks


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: Sequence[str] | str, *,
                   task_dir: str | os.PathLike | None = None, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 1, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model`; {task: {metric: value}} (stderr entries and aliases dropped).

    ``task_dir`` adds a folder of task YAML files; ``limit`` caps the documents per task.
    """
    tasks = _check_tasks(tasks)
    if task_dir is not None and not Path(task_dir).is_dir():
        raise ValueError(f"task_dir: {task_dir} is not a directory")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected an integer >= 1 or None, got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot: expected an integer >= 0 or None, got {num_fewshot!r}")
    lm_eval, _, TaskManager = _import_lm_eval()
    manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: lm-eval does not know {unknown}" + (f" (also searched {task_dir})" if task_dir else ""))
    was_training = model.training
    try:
        output = lm_eval.simple_evaluate(
            model=lm_eval_model(model, tokenizer, batch_size=batch_size), tasks=tasks, limit=limit,
            num_fewshot=num_fewshot, task_manager=manager, log_samples=False, bootstrap_iters=0,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    return {task: {_metric_name(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in output["results"].items()}


def _metric_name(key: str) -> str:
    """lm-eval reports 'acc,none' (metric, filter); keep the metric, and the filter if it is not 'none'."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"
