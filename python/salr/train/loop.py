"""The fine-tuning loop: trains exactly the parameters with requires_grad=True of a causal LM.

Method-agnostic: SALR, LoSA, SALOR and plain LoRA modules all plug in, because the loop only looks
at ``requires_grad`` and calls ``model(input_ids=..., labels=...)`` (HF style, ``.loss`` out).

- AdamW over the trainable parameters (weight decay on matrices only), warmup + cosine / linear /
  constant schedule (LambdaLR), gradient accumulation, clipping, optional gradient checkpointing,
  bf16 autocast on devices that support it, periodic evaluation, tqdm with loss and tokens/s.
- Optional distillation from a frozen dense teacher (``teacher=``, :mod:`salr.train.distill`).
- Data comes from a deterministic, resumable batch source (:class:`TokenWindows`), whose position is
  part of the checkpoint, so a resumed run reproduces the uninterrupted loss curve exactly.
- Checkpoints (:mod:`salr.train.checkpoint`) are atomic; Ctrl-C saves one at the last finished step and
  re-raises; ``resume=True`` continues from the newest complete one in ``run_dir``.
- Under torch.distributed (torchrun / accelerate launch) the model is wrapped in DDP, or sharded
  with FSDP2 ``fully_shard`` (``TrainConfig.parallel="fsdp"``); every rank takes its slice of each
  global micro-batch, and only rank 0 writes checkpoints (gathered from all ranks under FSDP) and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from salr.io.files import jsonable
from salr.train import checkpoint as ckpt
from salr.train import distill
from salr.train.config import TRAJECTORY_FIELDS, StepCallback, TrainConfig, lr_factor
from salr.train.data import as_source, shard_batch
from salr.train.distributed import distributed_context, _fully_shard_blocks, _grad_sync


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the model must return a scalar .loss when called with input_ids and labels")
    return loss


# ----------------------------------------------------------------------------- interrupts

@contextlib.contextmanager
def _defer_sigint():
    """Holds Ctrl-C back while the optimizer update runs, so a checkpoint never sees half an update."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- the loop

def _autocast(config: TrainConfig, device: torch.device):
    if config.autocast_dtype is None:
        return contextlib.nullcontext()
    if config.autocast_dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _enable_grad_checkpointing(model: torch.nn.Module) -> None:
    # use_reentrant=False: gradients reach adapters even though the frozen embeddings' output
    # does not require grad, and it composes with DDP.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("TrainConfig.grad_checkpointing: the model has no gradient_checkpointing_enable "
                         "(a Hugging Face PreTrainedModel does)")
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with recompute


def _make_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on vectors (biases, norm scales, per-channel scales): standard practice.
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _run_eval(eval_fn: Callable[[torch.nn.Module], Any], model: torch.nn.Module) -> Any:
    """eval_fn(model) in eval mode, without grad, without touching the training RNG streams."""
    was_training = model.training
    model.eval()
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = eval_fn(model)
    finally:
        model.train(was_training)
    return jsonable(result)


def _append_log(run_dir: Path | None, entry: dict[str, Any]) -> None:
    if run_dir is not None:
        with open(run_dir / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _logged(entry: dict[str, Any], config: TrainConfig) -> bool:
    return entry["step"] % config.log_every == 0 or entry["step"] == config.steps or entry["eval"] is not None


def _rewrite_log(run_dir: Path | None, history: list[dict[str, Any]], config: TrainConfig) -> None:
    # A resumed run drops the log lines written after its checkpoint: they are about to be redone.
    if run_dir is not None:
        with open(run_dir / "train_log.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in history if _logged(e, config))


def _resolve_resume(resume: bool | str | os.PathLike, run_dir: Path | None, world: int) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        path = ckpt.find_latest_checkpoint(run_dir) if run_dir is not None else None
        if world > 1:  # every rank must continue from the checkpoint rank 0 chose
            box = [str(path) if path is not None else None]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] is not None else None
        return path
    path = Path(resume)
    reason = ckpt.verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"resume: {path} is not a complete checkpoint: {reason}")
    return path




def train(model: torch.nn.Module, train_batches: Any, config: TrainConfig, run_dir: str | os.PathLike | None = None,
          eval_fn: Callable[[torch.nn.Module], Any] | None = None,
          resume: bool | str | os.PathLike = True,
          on_step: StepCallback | Sequence[StepCallback] | None = None,
          teacher: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """Fine-tunes the parameters of ``model`` that have requires_grad=True; returns the history.

    model: a causal LM called as ``model(input_ids=..., labels=...)`` returning ``.loss``; it is
      trained on the device it is on (with several ranks, put it on this rank's device first).
      Under FSDP it is sharded in place and stays so (its parameters are DTensors; the rank-0
      checkpoints hold the full tensors, :func:`salr.train.checkpoint.full_tensor` gathers one).
    train_batches: a :class:`TokenWindows` (or any object with ``take(rows)``, ``state_dict()``,
      ``load_state_dict()``), or an iterable whose items are global micro-batches (token tensors
      or dicts with input_ids / labels / attention_mask).
    run_dir: where checkpoints (``checkpoints/step-N``) and ``train_log.jsonl`` go; None = nowhere.
    eval_fn: ``eval_fn(model) -> float | dict``, called every eval_every steps and at the end (in
      eval mode, no grad, RNG untouched) on every rank.
    resume: True = continue from the newest complete checkpoint in run_dir if there is one; a path
      = from that checkpoint; False = start over.
    on_step: ``fn(model, step)`` (or a list of them) with ``step`` = the optimizer steps finished:
      once before the first step (0, or the resumed step) and after every optimizer update, before
      that step is evaluated or checkpointed (e.g. :func:`salr.methods.salor.factors.update_all_masks`, the SALOR
      mask schedule). What a callback changes outside the trainable parameters is not checkpointed:
      it must be a function of the step and those parameters, so a resume rebuilds it.
    teacher: the frozen dense model to distil from (:mod:`salr.train.distill`), on the student's
      device, run under no_grad on every micro-batch; needed when config.distilling, unused otherwise.

    Seeds torch's global RNG with config.seed (a resume restores the saved RNG state instead).

    History: one dict per optimizer step: step, loss (mean over the step's micro-batches and ranks),
    lr (used by that step), grad_norm (before clipping), tokens, tokens_per_s, eval (None unless
    evaluated at that step). Checkpoints also carry the history, so a resumed run returns all of it.
    """
    callbacks = _check_train_args(config, on_step)
    rank, world = distributed_context()
    is_main = rank == 0
    model = ckpt.unwrap_model(model)
    params = _trainable(model, config, world)
    device = next(iter(params.values())).device
    teacher = distill.check_teacher(teacher, config, model, device)
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None and is_main:
        run_path.mkdir(parents=True, exist_ok=True)
    log_path = run_path if is_main else None
    source = as_source(train_batches)

    torch.manual_seed(config.seed)  # dropout etc.; a resume replaces it with the saved RNG state
    if config.grad_checkpointing:
        _enable_grad_checkpointing(model)
    fsdp = world > 1 and config.parallel == "fsdp"
    if fsdp:  # before the optimizer, which must hold the sharded parameters
        _fully_shard_blocks(model, device, world)
        params = ckpt.trainable_parameters(model)
    optimizer = _make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    step, history, resumed = _restore(resume, run_path, world, model, optimizer, scheduler, source, config,
                                      is_main, log_path)
    for fn in callbacks:
        fn(model, step)
    if step >= config.steps:
        return history

    train_model = _wrap_ddp(model, device, config) if world > 1 and not fsdp else model
    was_training = model.training
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="finetune", unit="step",
               disable=not (config.progress and is_main), dynamic_ncols=True)
    run = _Progress(step, history, data_state=source.state_dict(), rng=ckpt.capture_rng_state(),
                    last_saved=step if resumed else -1)
    save_kwargs = dict(keep=config.keep_checkpoints, config=config.to_dict(), extra={"world_size": world})

    def save(at_step: int) -> None:
        if run_path is not None and at_step != run.last_saved:
            if is_main or fsdp:  # under FSDP every rank joins the gather, rank 0 writes
                ckpt.save_checkpoint(run_path, at_step, model, optimizer, scheduler, data_state=run.data_state,
                                     history=run.history, rng_state=run.rng, write=is_main, **save_kwargs)
            run.last_saved = at_step

    step_context = _StepContext(train_model, params, optimizer, scheduler, source, config, device, rank, world,
                                fsdp, callbacks, teacher)
    try:
        while run.step < config.steps:
            entry = _train_step(step_context, model, run)
            if eval_fn is not None and ((config.eval_every and run.step % config.eval_every == 0)
                                        or run.step == config.steps):
                entry["eval"] = _run_eval(eval_fn, model)
            if _logged(entry, config):
                _append_log(log_path, entry)
                bar.set_postfix(_postfix(entry), refresh=False)
            bar.update(1)
            if (config.save_every and run.step % config.save_every == 0) or run.step == config.steps:
                with _defer_sigint():
                    save(run.step)
    except KeyboardInterrupt:
        # The last finished step is consistent (updates are shielded from Ctrl-C): save it so the
        # run resumes exactly there; gradients of the unfinished step are dropped. Not under FSDP:
        # the save gathers from every rank, and interrupted ranks are not in step to do that.
        if run.step > 0 and not fsdp:
            save(run.step)
        elif run.step > 0 and is_main and run_path is not None and run.last_saved != run.step:
            warnings.warn(f"train: interrupted at step {run.step} under FSDP: no checkpoint saved there; a "
                          f"resume continues from the last periodic one (save_every)", stacklevel=2)
        raise
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    return run.history


# ----------------------------------------------------------------------------- train()'s parts

def _check_train_args(config: TrainConfig, on_step: Any) -> list[StepCallback]:
    if not isinstance(config, TrainConfig):
        raise ValueError("config must be a TrainConfig")
    callbacks = [on_step] if callable(on_step) else list(on_step or ())
    if not all(callable(fn) for fn in callbacks):
        raise ValueError("on_step: expected a callable fn(model, step) or a list of them")
    return callbacks


def _trainable(model: torch.nn.Module, config: TrainConfig, world: int) -> dict[str, torch.nn.Parameter]:
    params = ckpt.trainable_parameters(model)
    if not params:
        raise ValueError("train: the model has no parameter with requires_grad=True; freeze the base "
                         "and leave the adapters trainable")
    if config.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size: {config.batch_size} rows do not split over {world} ranks")
    return params


def _restore(resume: bool | str | os.PathLike, run_path: Path | None, world: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any, source: Any, config: TrainConfig, is_main: bool,
             log_path: Path | None) -> tuple[int, list[dict[str, Any]], bool]:
    """(step, history, resumed): the checkpoint `resume` names loaded into model, optimizer,
    scheduler and data source, or (0, [], False) for a fresh run."""
    resume_from = _resolve_resume(resume, run_path, world)
    if resume_from is None:
        return 0, [], False
    state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
    source.load_state_dict(state["data"])
    changed = [k for k in TRAJECTORY_FIELDS if k in state["config"] and state["config"][k] != config.to_dict()[k]]
    if changed and is_main:
        warnings.warn(f"resuming {resume_from} with changed settings {changed}: the run will not "
                      f"match an uninterrupted one", stacklevel=3)
    history = list(state["history"])
    _rewrite_log(log_path, history, config)
    return int(state["step"]), history, True


def _wrap_ddp(model: torch.nn.Module, device: torch.device, config: TrainConfig) -> torch.nn.Module:
    # broadcast_buffers=False: the buffers are the frozen sparse bases (and SALOR masks, which every
    # rank recomputes from the same synchronized factors); re-sending them before every forward
    # would move the whole compressed model over the wire each micro-step for nothing.
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=config.ddp_find_unused_parameters,
                                   broadcast_buffers=False)


@dataclass
class _Progress:
    """Where the run is: finished steps, their history, and the data position and RNG state after
    the last finished step (what a checkpoint saves), and the last step saved."""

    step: int
    history: list[dict[str, Any]]
    data_state: dict[str, Any]
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]]
    last_saved: int


@dataclass
class _StepContext:
    """What every optimizer step uses and does not change."""

    train_model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    source: Any
    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    fsdp: bool
    callbacks: list[StepCallback] = field(default_factory=list)
    teacher: torch.nn.Module | None = None


def _forward_backward(ctx: _StepContext) -> tuple[float, int]:
    """The step's micro-batches, forward and backward; returns (mean loss over micro-batches and
    ranks, tokens over ranks)."""
    config, device = ctx.config, ctx.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for micro in range(config.grad_accum):
        kwargs, n_tokens = shard_batch(ctx.source.take(config.batch_size), ctx.rank, ctx.world, device)
        tokens += n_tokens
        sync = micro == config.grad_accum - 1
        with _grad_sync(ctx.train_model, ctx.fsdp, sync) if ctx.world > 1 else contextlib.nullcontext():
            with _autocast(config, device):
                output = ctx.train_model(**kwargs, **distill.student_kwargs(config, ctx.teacher))
                loss = distill.blend(_loss_of(output), output, ctx.teacher, kwargs, config)
            # Mean over micro-batches (DDP / FSDP average over ranks): the gradient of the
            # global-batch mean when every micro-batch holds the same number of tokens.
            (loss.float() / config.grad_accum).backward()
        loss_sum += loss.detach().double()
    stats = torch.stack([loss_sum / config.grad_accum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if ctx.world > 1:
        dist.all_reduce(stats)  # logging only: the average loss and the total tokens
        stats[0] /= ctx.world
    return float(stats[0]), int(stats[1])


def _train_step(ctx: _StepContext, model: torch.nn.Module, run: _Progress) -> dict[str, Any]:
    """One optimizer step; advances `run` and returns the step's history entry."""
    started = time.perf_counter()
    lr_now = ctx.optimizer.param_groups[0]["lr"]
    step_loss, step_tokens = _forward_backward(ctx)
    if not math.isfinite(step_loss):
        raise FloatingPointError(f"train: the loss became {step_loss} at step {run.step + 1} "
                                 f"(lower lr, enable clipping, or check the data)")
    with _defer_sigint():
        # Under FSDP the gradients are DTensor shards: the norm comes back replicated.
        if ctx.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(ctx.params.values()), ctx.config.max_grad_norm)
        else:
            grads = [p.grad for p in ctx.params.values() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = float(ckpt.full_tensor(norm))
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.data_state = ctx.source.state_dict()
        run.rng = ckpt.capture_rng_state()  # a Ctrl-C mid-next-step must not save its RNG
        for fn in ctx.callbacks:  # after the RNG capture, as the call a resume makes first
            fn(model, run.step)
        elapsed = max(time.perf_counter() - started, 1e-9)
        entry = {"step": run.step, "loss": step_loss, "lr": lr_now, "grad_norm": grad_norm,
                 "tokens": step_tokens, "tokens_per_s": step_tokens / elapsed, "eval": None}
        run.history.append(entry)
    return entry


def _postfix(entry: dict[str, Any]) -> dict[str, str]:
    postfix = {"loss": f"{entry['loss']:.4f}", "lr": f"{entry['lr']:.2e}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
    evals = entry["eval"] if isinstance(entry["eval"], dict) else {"eval": entry["eval"]}
    postfix.update({k: f"{v:.4g}" for k, v in evals.items() if isinstance(v, (int, float))})
    return postfix
