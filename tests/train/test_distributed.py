"""2 CPU processes (gloo, joined through torchrun's environment variables) train the tiny model under DDP and under
FSDP2 (TrainConfig.parallel) and must match one process with the same global batch: losses, gradient norms, final
parameters, checkpoints (written by rank 0 only, the same tensors as one process writes), a resume from their own
checkpoint and one from a single-process checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from salr.train import checkpoint as ckpt
from salr.train.config import TrainConfig
from salr.train.data import TokenWindows
from salr.train.distill import frozen_teacher
from salr.train.distributed import init_distributed_from_env
from salr.train.loop import train
from salr_helpers import TINY_VOCAB, tiny_model
from tiny_lm import make_tiny_lm, make_tokens, trainable_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
TOL = 1e-5  # DDP / FSDP average the two half-batch gradients: float32 rounding differs from one full batch


def config(**overrides) -> TrainConfig:
    # max_grad_norm=0.4: below some steps' gradient norm (~0.3-0.5), so clipping acts
    base = dict(lr=1e-2, steps=4, warmup_steps=1, batch_size=4, grad_accum=2, save_every=2, keep_checkpoints=0,
                max_grad_norm=0.4, autocast_dtype=None, progress=False)
    return TrainConfig(**{**base, **overrides})


def data() -> TokenWindows:
    return TokenWindows(make_tokens(), 16, seed=11)


def salr_model(**method) -> torch.nn.Module:
    """A tiny Llama converted to SALR: the sparse bases are buffers, the LoRA factors the trainable parameters."""
    from salr.methods.convert import convert
    model = tiny_model("llama")
    convert(model, sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=2, progress=False, **method)
    return model.train()


def salr_data() -> TokenWindows:
    return TokenWindows(make_tokens() % TINY_VOCAB, 16, seed=3)


def train_salr(parallel: str = "ddp") -> tuple[torch.nn.Module, list[dict]]:
    model = salr_model()
    windows = salr_data()
    # No clipping here (the tiny-LM runs clip): the norm is still computed and logged, from DTensors under FSDP.
    return model, train(model, windows, config(steps=3, save_every=0, max_grad_norm=None, parallel=parallel),
                        resume=False)


def train_distilled(parallel: str = "ddp") -> tuple[torch.nn.Module, list[dict]]:
    """The tiny LM distilled from another (frozen, never wrapped: each rank runs its own copy on its slice)."""
    model = make_tiny_lm()
    distill = dict(distill_weight=0.5, distill_temperature=2.0, distill_hidden_weight=0.5)
    return model, train(model, data(), config(steps=3, save_every=0, parallel=parallel, **distill), resume=False,
                        teacher=frozen_teacher(make_tiny_lm(seed=1)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole: FSDP's are DTensor shards (gathering them is a collective)."""
    return {n: ckpt.full_tensor(p.detach()).clone() for n, p in ckpt.trainable_parameters(model).items()}


def _worker(rank: int, port: int, out: str, parallel: str, single_run: str) -> None:
    torch.set_num_threads(1)
    # What torchrun / accelerate launch put in the environment of each process they start.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert init_distributed_from_env(backend="gloo") == torch.device("cpu")
    assert dist.get_world_size() == WORLD
    try:
        out_dir = Path(out)
        # 1. A 4-step run, checkpoints at 2 and 4 in a run directory both ranks are given.
        model = make_tiny_lm()
        history = train(model, data(), config(parallel=parallel), run_dir=out_dir / "run")
        save_file(full_snapshot(model), str(out_dir / f"params.rank{rank}.safetensors"))
        layout = {n: [type(p).__name__, list(p.shape), list(getattr(p, "to_local", lambda: p)().shape)]
                  for n, p in ckpt.trainable_parameters(model).items()}
        (out_dir / f"layout.rank{rank}.json").write_text(json.dumps(layout))
        if rank == 0:
            (out_dir / "history.json").write_text(json.dumps(history))
        # 2. Resumes from step 2 (rank 0 chooses the checkpoint, rank 1 follows): the run's own, and
        #    one a single process wrote.
        for name, source in (("resumed", out_dir / "run"), ("from_single", Path(single_run))):
            if rank == 0:
                shutil.copytree(source / "checkpoints" / "step-00000002", out_dir / name / "checkpoints" / "step-00000002")
            dist.barrier()
            model = make_tiny_lm()
            resumed = train(model, data(), config(parallel=parallel), run_dir=out_dir / name)
            save_file(full_snapshot(model), str(out_dir / f"{name}.rank{rank}.safetensors"))
            if rank == 0:
                (out_dir / f"{name}_history.json").write_text(json.dumps(resumed))
        # 3. A SALR-converted model: its sparse bases are buffers, which stay whole on every rank.
        model, salr_history = train_salr(parallel)
        save_file(full_snapshot(model), str(out_dir / f"salr.rank{rank}.safetensors"))
        buffers = {n: [type(b).__name__, list(b.shape)] for n, b in model.named_buffers()}
        (out_dir / f"salr.rank{rank}.json").write_text(json.dumps({"history": salr_history, "buffers": buffers}))
        # 4. Distillation from a teacher every rank holds whole.
        model, distill_history = train_distilled(parallel)
        save_file(full_snapshot(model), str(out_dir / f"distill.rank{rank}.safetensors"))
        (out_dir / f"distill.rank{rank}.json").write_text(json.dumps(distill_history))
        # 5. A micro-batch that does not split over the ranks is refused, naming the field.
        try:
            train(make_tiny_lm(), data(), config(batch_size=3, parallel=parallel), resume=False)
        except ValueError as e:
            (out_dir / f"error.rank{rank}.txt").write_text(str(e))
        if parallel == "fsdp":  # SALOR's mask updates would mix plain masks with DTensor factors: refused
            model = salr_model(method="salor", factor_sparsity=0.5)
            try:
                train(model, salr_data(), config(parallel=parallel), resume=False)
            except ValueError as e:
                (out_dir / f"salor_error.rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    model = make_tiny_lm()
    history = train(model, data(), config(), run_dir=run_dir)
    return run_dir, history, trainable_snapshot(model)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, tmp_path_factory, single):
    pytest.importorskip("transformers", reason="transformers is not installed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp(request.param)
    mp.spawn(_worker, args=(_free_port(), str(out), request.param, str(single[0])), nprocs=WORLD, join=True)
    return out, request.param


def _assert_params_close(params, ref):
    assert params.keys() == ref.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref[name], atol=TOL, rtol=0)


def _assert_same_curve(history, ref_history):
    for key in ("loss", "grad_norm"):  # grad_norm: before clipping (on DTensor shards under FSDP)
        assert [e[key] for e in history] == pytest.approx([e[key] for e in ref_history], abs=TOL, rel=0), key


def test_two_ranks_match_one_process(two_ranks, single):
    out, parallel = two_ranks
    _, ref_history, ref_params = single
    history = json.loads((out / "history.json").read_text())
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    _assert_same_curve(history, ref_history)
    assert min(e["grad_norm"] for e in history) < 0.4 < max(e["grad_norm"] for e in history)  # clipping acted
    assert [e["tokens"] for e in history] == [e["tokens"] for e in ref_history] == [4 * 2 * 16] * 4
    rank0 = load_file(str(out / "params.rank0.safetensors"))
    rank1 = load_file(str(out / "params.rank1.safetensors"))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # one model: replicas, or shards of one
    _assert_params_close(rank0, ref_params)


def test_fsdp_shards_and_ddp_replicates(two_ranks, single):
    out, parallel = two_ranks
    layouts = [json.loads((out / f"layout.rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert layouts[0].keys() == single[2].keys()
    for name, ref in single[2].items():
        kinds = {layout[name][0] for layout in layouts}
        assert all(layout[name][1] == list(ref.shape) for layout in layouts)
        local_rows = [layout[name][2][0] for layout in layouts]
        if parallel == "fsdp":  # each rank holds its rows of dim 0 (FSDP2's Shard(0)), together all of them
            assert kinds == {"DTensor"} and sum(local_rows) == ref.shape[0] and max(local_rows) < ref.shape[0]
        else:
            assert kinds == {"Parameter"} and local_rows == [ref.shape[0]] * WORLD


def test_checkpoints_hold_the_single_process_tensors(two_ranks, single):
    """Rank 0 writes full (gathered) tensors: the same files, up to float32 rounding, as one process writes."""
    out, _ = two_ranks
    for step in ("step-00000002", "step-00000004"):
        mine, ref = out / "run" / "checkpoints" / step, single[0] / "checkpoints" / step
        for file in (ckpt.TRAINABLE_FILE, ckpt.TRAIN_STATE_FILE):
            tensors, ref_tensors = load_file(str(mine / file)), load_file(str(ref / file))
            assert tensors.keys() == ref_tensors.keys()
            _assert_params_close({n: t for n, t in tensors.items() if not n.startswith("rng.")},
                                 {n: t for n, t in ref_tensors.items() if not n.startswith("rng.")})
        assert any(n.endswith("exp_avg_sq") for n in tensors)
        state, ref_state = ckpt.read_checkpoint_state(mine), ckpt.read_checkpoint_state(ref)
        assert state["optimizer"] == ref_state["optimizer"] and state["trainable_names"] == ref_state["trainable_names"]


def test_salr_model_matches_one_process(two_ranks):
    """SALR layers under DDP / FSDP: the adapters train as in one process, the sparse-base buffers stay replicated."""
    out, parallel = two_ranks
    model, ref_history = train_salr()
    ref_buffers = {n: [type(b).__name__, list(b.shape)] for n, b in model.named_buffers()}
    assert any(n.endswith(".bitmap") for n in ref_buffers)
    for rank in range(WORLD):
        record = json.loads((out / f"salr.rank{rank}.json").read_text())
        _assert_same_curve(record["history"], ref_history)
        assert record["buffers"] == ref_buffers  # plain tensors, full shape: never sharded
        _assert_params_close(load_file(str(out / f"salr.rank{rank}.safetensors")), trainable_snapshot(model))
    assert all(e["grad_norm"] > 0 for e in ref_history)


def test_distillation_matches_one_process(two_ranks):
    out, _ = two_ranks
    model, ref_history = train_distilled()
    for rank in range(WORLD):
        _assert_same_curve(json.loads((out / f"distill.rank{rank}.json").read_text()), ref_history)
        _assert_params_close(load_file(str(out / f"distill.rank{rank}.safetensors")), trainable_snapshot(model))


def test_only_rank_0_writes(two_ranks):
    run = two_ranks[0] / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # one writer, no duplicate lines
    state = ckpt.read_checkpoint_state(run / "checkpoints" / "step-00000004")
    assert state["extra"]["world_size"] == WORLD and state["data"]["consumed"] == 4 * 4 * 2


def test_resume_under_two_ranks_and_across_world_sizes(two_ranks, single, tmp_path):
    out, _ = two_ranks
    _, ref_history, ref_params = single
    # From the 2-rank run's own step-2 checkpoint, and from the single process's one.
    for name in ("resumed", "from_single"):
        resumed = json.loads((out / f"{name}_history.json").read_text())
        _assert_same_curve(resumed, ref_history)
        for rank in range(WORLD):
            _assert_params_close(load_file(str(out / f"{name}.rank{rank}.safetensors")), ref_params)
    # A checkpoint written by the 2-rank run resumes in a single process too.
    shutil.copytree(out / "run" / "checkpoints" / "step-00000002", tmp_path / "checkpoints" / "step-00000002")
    model = make_tiny_lm()
    history = train(model, data(), config(), run_dir=tmp_path)
    _assert_same_curve(history, ref_history)
    _assert_params_close(trainable_snapshot(model), ref_params)


def test_uneven_micro_batch_and_fsdp_salor_are_refused(two_ranks):
    out, parallel = two_ranks
    for rank in range(WORLD):
        assert "TrainConfig.batch_size" in (out / f"error.rank{rank}.txt").read_text()
        if parallel == "fsdp":
            assert "TrainConfig.parallel='fsdp': SALOR" in (out / f"salor_error.rank{rank}.txt").read_text()
