"""The fine-tuning loop: trains exactly the parameters with requires_grad=True of a causal LM.

Method-agnostic: SALR, LoSA, SALOR and plain LoRA modules all plug in, because the loop only looks
at ``requires_grad`` and calls ``model(input_ids=..., labels=...)`` (HF style, ``.loss`` out).

- AdamW over the trainable parameters (weight decay on matrices only), warmup + cosine / linear /
  constant schedule (LambdaLR), gradient accumulation, clipping, optional gradient checkpointing,
  bf16 autocast on devices that support it, periodic evaluation, tqdm with loss and tokens/s.
- Data comes from a deterministic, resumable batch source (:class:`TokenWindows`), whose position is
  part of the checkpoint, so a resumed run reproduces the uninterrupted loss curve exactly.
- Checkpoints (:mod:`salr.checkpoint`) are atomic; Ctrl-C saves one at the last finished step and
  re-raises; ``resume=True`` continues from the newest complete one in ``run_dir``.
- Under torch.distributed (torchrun / accelerate launch) the model is wrapped in DDP, or sharded
  with FSDP2 ``fully_shard`` (``TrainConfig.parallel="fsdp"``); every rank takes its slice of each
  global micro-batch, and only rank 0 writes checkpoints (gathered from all ranks under FSDP) and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from salr import checkpoint as ckpt
from salr._checks import check_int
from salr.batches import IterableBatches, TokenWindows, as_source, shard_batch  # noqa: F401 (re-exported)

SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp")
StepCallback = Callable[[torch.nn.Module, int], Any]  # train(on_step=...): fn(model, finished_steps)
AUTOCAST_CHOICES = ("auto", "bfloat16", None)
# Config fields that change the trajectory: a resume with other values is no longer "the same run".
_TRAJECTORY_FIELDS = ("lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "batch_size",
                      "grad_accum", "max_grad_norm", "seed", "betas", "eps")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; every field is checked here (ValueError names it).

    batch_size is the *global* micro-batch (rows per forward, summed over ranks); one optimizer
    step sees batch_size * grad_accum rows. eval_every / save_every = 0: only at the end.
    autocast_dtype: "auto" = bf16 on a CUDA device that supports it, off elsewhere (CPU autocast
    would hand bf16 activations to modules holding fp32 weights); "bfloat16" forces it; None = off.
    parallel: with more than one rank, "ddp" replicates the model, "fsdp" shards its parameters
    (FSDP2, one unit per decoder block + the root); ignored in a single process.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    steps: int = 100
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    autocast_dtype: str | None = "auto"
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    progress: bool = True
    ddp_find_unused_parameters: bool = False
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{field}: {why} (got {getattr(self, field)!r})")

        def check_int(field: str, minimum: int) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(field, f"must be an integer >= {minimum}")

        def check_float(field: str, minimum: float, maximum: float = math.inf, open_min: bool = False) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(field, "must be a finite number")
            if value < minimum or (open_min and value == minimum) or value > maximum:
                lo = f"> {minimum}" if open_min else f">= {minimum}"
                raise bad(field, f"must be {lo}" + (f" and <= {maximum}" if maximum != math.inf else ""))

        check_float("lr", 0.0, open_min=True)
        check_float("weight_decay", 0.0)
        check_float("min_lr_ratio", 0.0, 1.0)
        check_float("eps", 0.0, open_min=True)
        check_int("steps", 1)
        check_int("warmup_steps", 0)
        check_int("batch_size", 1)
        check_int("grad_accum", 1)
        check_int("eval_every", 0)
        check_int("save_every", 0)
        check_int("keep_checkpoints", 0)
        check_int("seed", 0)
        check_int("log_every", 1)
        if self.warmup_steps > self.steps:
            raise bad("warmup_steps", f"must be <= steps ({self.steps})")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise bad("parallel", f"must be one of {', '.join(PARALLEL)}")
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", 0.0, open_min=True)
        if self.autocast_dtype in ("bf16", torch.bfloat16):
            self.autocast_dtype = "bfloat16"
        if self.autocast_dtype not in AUTOCAST_CHOICES:
            raise bad("autocast_dtype", "must be 'auto', 'bfloat16' or None")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        for flag in ("grad_checkpointing", "progress", "ddp_find_unused_parameters"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be True or False")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ----------------------------------------------------------------------------- schedule

def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr for the optimizer update number ``step`` (0-based).

    Warmup ramps linearly so the first update already moves (1/warmup of lr) and update number
    warmup-1 uses the full lr; afterwards cosine / linear decay from 1 towards min_lr_ratio over the
    remaining steps (reached one step after the last update), or constant.
    """
    check_int(step, "step")
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(1.0, progress)
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)  # linear


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the model must return a scalar .loss when called with input_ids and labels")
    return loss


# ----------------------------------------------------------------------------- distributed

def distributed_context() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(backend: str | None = None) -> torch.device:
    """Joins the process group torchrun / accelerate launch described in the environment.

    Returns the device this rank should put its model on (cuda:LOCAL_RANK, or cpu). A no-op
    returning the default device when WORLD_SIZE is unset or 1.
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        raise ValueError(f"backend: must be None, 'gloo', 'nccl', 'mpi', 'ucc' or 'xccl', got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return device


def _fully_shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: each decoder block is one unit (its parameters gathered just before it runs,
    freed after), the root unit holds the rest (embeddings, final norm, head).

    Only nn.Parameters are sharded: a SALR layer's sparse base (bitmap, values, offsets) is made of
    buffers and stays replicated on every rank; adapters, embeddings and norms are sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from salr.models import find_blocks
    from salr.salor import has_factor_masks

    if isinstance(model, FSDPModule):
        return  # sharded by an earlier train() call
    if has_factor_masks(model):  # its mask updates would mix plain mask buffers with DTensor factors
        raise ValueError("TrainConfig.parallel='fsdp': SALOR factor masks are not supported under FSDP; "
                         "use parallel='ddp'")
    try:
        _, blocks = find_blocks(model)
    except ValueError as exc:
        raise ValueError(f"TrainConfig.parallel='fsdp': {exc}") from exc
    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _grad_sync(train_model: torch.nn.Module, fsdp: bool, sync: bool):
    """Gradient accumulation: ranks exchange gradients only on the micro-batch that ends a step."""
    if fsdp:
        train_model.set_requires_gradient_sync(sync)
    elif not sync:
        return train_model.no_sync()  # DDP
    return contextlib.nullcontext()


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
    return _jsonable(result)


def _jsonable(value: Any) -> Any:
    """Eval results go into state.json: tensors and NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


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
          on_step: StepCallback | Sequence[StepCallback] | None = None) -> list[dict[str, Any]]:
    """Fine-tunes the parameters of ``model`` that have requires_grad=True; returns the history.

    model: a causal LM called as ``model(input_ids=..., labels=...)`` returning ``.loss``; it is
      trained on the device it is on (with several ranks, put it on this rank's device first).
      Under FSDP it is sharded in place and stays so (its parameters are DTensors; the rank-0
      checkpoints hold the full tensors, :func:`salr.checkpoint.full_tensor` gathers one).
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
      that step is evaluated or checkpointed (e.g. :func:`salr.salor.update_all_masks`, the SALOR
      mask schedule). What a callback changes outside the trainable parameters is not checkpointed:
      it must be a function of the step and those parameters, so a resume rebuilds it.

    Seeds torch's global RNG with config.seed (a resume restores the saved RNG state instead).

    History: one dict per optimizer step: step, loss (mean over the step's micro-batches and ranks),
    lr (used by that step), grad_norm (before clipping), tokens, tokens_per_s, eval (None unless
    evaluated at that step). Checkpoints also carry the history, so a resumed run returns all of it.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError("config must be a TrainConfig")
    callbacks = [on_step] if callable(on_step) else list(on_step or ())
    if not all(callable(fn) for fn in callbacks):
        raise ValueError("on_step: expected a callable fn(model, step) or a list of them")
    rank, world = distributed_context()
    is_main = rank == 0
    model = ckpt.unwrap_model(model)
    params = ckpt.trainable_parameters(model)
    if not params:
        raise ValueError("train: the model has no parameter with requires_grad=True; freeze the base "
                         "and leave the adapters trainable")
    if config.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size: {config.batch_size} rows do not split over {world} ranks")
    device = next(iter(params.values())).device
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
        _fully_shard(model, device, world)
        params = ckpt.trainable_parameters(model)
    optimizer = _make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    step, history = 0, []
    resume_from = _resolve_resume(resume, run_path, world)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        source.load_state_dict(state["data"])
        step, history = int(state["step"]), list(state["history"])
        changed = [k for k in _TRAJECTORY_FIELDS
                   if k in state["config"] and state["config"][k] != config.to_dict()[k]]
        if changed and is_main:
            warnings.warn(f"resuming {resume_from} with changed settings {changed}: the run will not "
                          f"match an uninterrupted one", stacklevel=2)
        _rewrite_log(log_path, history, config)
    for fn in callbacks:
        fn(model, step)
    if step >= config.steps:
        return history

    train_model: torch.nn.Module = model
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # broadcast_buffers=False: the buffers are the frozen sparse bases (and SALOR masks, which every
        # rank recomputes from the same synchronized factors); re-sending them before every forward
        # would move the whole compressed model over the wire each micro-step for nothing.
        train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None,
                          find_unused_parameters=config.ddp_find_unused_parameters, broadcast_buffers=False)
    was_training = model.training
    model.train()

    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=step, desc="finetune", unit="step",
               disable=not (config.progress and is_main), dynamic_ncols=True)
    data_state_done = source.state_dict()  # the data position after the last finished step
    rng_done = ckpt.capture_rng_state()
    last_saved = step if resume_from is not None else -1
    save_kwargs = dict(keep=config.keep_checkpoints, config=config.to_dict(),
                       extra={"world_size": world})

    def save(at_step: int) -> None:
        nonlocal last_saved
        if run_path is not None and at_step != last_saved:
            if is_main or fsdp:  # under FSDP every rank joins the gather, rank 0 writes
                ckpt.save_checkpoint(run_path, at_step, model, optimizer, scheduler, data_state=data_state_done,
                                     history=history, rng_state=rng_done, write=is_main, **save_kwargs)
            last_saved = at_step

    try:
        while step < config.steps:
            started = time.perf_counter()
            lr_now = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            for micro in range(config.grad_accum):
                kwargs, n_tokens = shard_batch(source.take(config.batch_size), rank, world, device)
                tokens += n_tokens
                sync = micro == config.grad_accum - 1
                with _grad_sync(train_model, fsdp, sync) if world > 1 else contextlib.nullcontext():
                    with _autocast(config, device):
                        loss = _loss_of(train_model(**kwargs))
                    # Mean over micro-batches (DDP / FSDP average over ranks): the gradient of the
                    # global-batch mean when every micro-batch holds the same number of tokens.
                    (loss.float() / config.grad_accum).backward()
                loss_sum += loss.detach().double()
            stats = torch.stack([loss_sum / config.grad_accum, torch.tensor(float(tokens), dtype=torch.float64,
                                                                          device=device)])
            if world > 1:
                dist.all_reduce(stats)  # logging only: the average loss and the total tokens
                stats[0] /= world
            step_loss, step_tokens = float(stats[0]), int(stats[1])
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"train: the loss became {step_loss} at step {step + 1} "
                                         f"(lower lr, enable clipping, or check the data)")
            with _defer_sigint():
                # Under FSDP the gradients are DTensor shards: the norm comes back replicated.
                if config.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                else:
                    grads = [p.grad for p in params.values() if p.grad is not None]
                    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
                grad_norm = float(ckpt.full_tensor(norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                data_state_done = source.state_dict()
                rng_done = ckpt.capture_rng_state()  # a Ctrl-C mid-next-step must not save its RNG
                for fn in callbacks:  # after the RNG capture, as the call a resume makes first
                    fn(model, step)
                elapsed = max(time.perf_counter() - started, 1e-9)
                entry = {"step": step, "loss": step_loss, "lr": lr_now, "grad_norm": grad_norm,
                         "tokens": step_tokens, "tokens_per_s": step_tokens / elapsed, "eval": None}
                history.append(entry)
            if eval_fn is not None and ((config.eval_every and step % config.eval_every == 0)
                                        or step == config.steps):
                entry["eval"] = _run_eval(eval_fn, model)
            if _logged(entry, config):
                _append_log(log_path, entry)
                postfix = {"loss": f"{step_loss:.4f}", "lr": f"{lr_now:.2e}",
                           "tok/s": f"{entry['tokens_per_s']:.0f}"}
                evals = entry["eval"] if isinstance(entry["eval"], dict) else {"eval": entry["eval"]}
                postfix.update({k: f"{v:.4g}" for k, v in evals.items() if isinstance(v, (int, float))})
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                with _defer_sigint():
                    save(step)
    except KeyboardInterrupt:
        # The last finished step is consistent (updates are shielded from Ctrl-C): save it so the
        # run resumes exactly there; gradients of the unfinished step are dropped. Not under FSDP:
        # the save gathers from every rank, and interrupted ranks are not in step to do that.
        if step > 0 and not fsdp:
            save(step)
        elif step > 0 and is_main and run_path is not None and last_saved != step:
            warnings.warn(f"train: interrupted at step {step} under FSDP: no checkpoint saved there; a "
                          f"resume continues from the last periodic one (save_every)", stacklevel=2)
        raise
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    return history
