"""2 CPU processes (gloo, DDP, joined through torchrun's environment variables) train the tiny model and must match one process with the same global
batch: losses, final parameters, checkpoints (written by rank 0 only) and a resume under DDP."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from salr import checkpoint as ckpt
from salr.training import TokenWindows, TrainConfig, init_distributed_from_env, train
from tiny_lm import make_tiny_lm, make_tokens, trainable_snapshot

WORLD = 2
TOL = 1e-5  # DDP averages the two half-batch gradients: float32 rounding differs from one full batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Like the workers: one thread, fast on tiny matrices and on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> TrainConfig:
    base = dict(lr=1e-2, steps=4, warmup_steps=1, batch_size=4, grad_accum=2, save_every=2, keep_checkpoints=0,
                autocast_dtype=None, progress=False)
    return TrainConfig(**{**base, **overrides})


def data() -> TokenWindows:
    return TokenWindows(make_tokens(), 16, seed=11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # What torchrun / accelerate launch put in the environment of each process they start.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert init_distributed_from_env(backend="gloo") == torch.device("cpu")
    assert dist.get_world_size() == WORLD
    try:
        from pathlib import Path
        out_dir = Path(out)
        # 1. A 4-step run, checkpoints at 2 and 4 in a run directory both ranks are given.
        model = make_tiny_lm()
        history = train(model, data(), config(), run_dir=out_dir / "run")
        save_file(trainable_snapshot(model), str(out_dir / f"params.rank{rank}.safetensors"))
        if rank == 0:
            (out_dir / "history.json").write_text(json.dumps(history))
        # 2. A resume under DDP from the step-2 checkpoint (rank 0 chooses it, rank 1 follows).
        if rank == 0:
            shutil.copytree(out_dir / "run" / "checkpoints" / "step-00000002",
                            out_dir / "resumed" / "checkpoints" / "step-00000002")
        dist.barrier()
        model = make_tiny_lm()
        resumed = train(model, data(), config(), run_dir=out_dir / "resumed")
        save_file(trainable_snapshot(model), str(out_dir / f"resumed.rank{rank}.safetensors"))
        if rank == 0:
            (out_dir / "resumed_history.json").write_text(json.dumps(resumed))
        # 3. A micro-batch that does not split over the ranks is refused, naming the field.
        try:
            train(make_tiny_lm(), data(), config(batch_size=3), resume=False)
        except ValueError as e:
            (out_dir / f"error.rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    model = make_tiny_lm()
    history = train(model, data(), config(), run_dir=run_dir)
    return run_dir, history, trainable_snapshot(model)


def _assert_params_close(params, ref):
    assert params.keys() == ref.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref[name], atol=TOL, rtol=0)


def test_two_ranks_match_one_process(two_ranks, single):
    _, ref_history, ref_params = single
    history = json.loads((two_ranks / "history.json").read_text())
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in ref_history], abs=TOL, rel=0)
    assert [e["tokens"] for e in history] == [e["tokens"] for e in ref_history] == [4 * 2 * 16] * 4
    rank0 = load_file(str(two_ranks / "params.rank0.safetensors"))
    rank1 = load_file(str(two_ranks / "params.rank1.safetensors"))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # DDP keeps the replicas identical
    _assert_params_close(rank0, ref_params)


def test_only_rank_0_writes(two_ranks):
    run = two_ranks / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # one writer, no duplicate lines
    state = ckpt.read_checkpoint_state(run / "checkpoints" / "step-00000004")
    assert state["extra"]["world_size"] == WORLD and state["data"]["consumed"] == 4 * 4 * 2


def test_resume_under_ddp_and_across_world_sizes(two_ranks, single, tmp_path):
    _, ref_history, ref_params = single
    resumed = json.loads((two_ranks / "resumed_history.json").read_text())
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in ref_history], abs=TOL, rel=0)
    _assert_params_close(load_file(str(two_ranks / "resumed.rank0.safetensors")), ref_params)
    # A checkpoint written by the 2-rank run resumes in a single process too.
    shutil.copytree(two_ranks / "run" / "checkpoints" / "step-00000002", tmp_path / "checkpoints" / "step-00000002")
    model = make_tiny_lm()
    history = train(model, data(), config(), run_dir=tmp_path)
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in ref_history], abs=TOL, rel=0)
    _assert_params_close(trainable_snapshot(model), ref_params)


def test_uneven_micro_batch_is_refused(two_ranks):
    for rank in range(WORLD):
        assert "TrainConfig.batch_size" in (two_ranks / f"error.rank{rank}.txt").read_text()
