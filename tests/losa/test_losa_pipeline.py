"""The LoSA procedure end to end on a tiny random Llama: schedule, layer-wise band, masks that only
grow, exact rank budget, fixed trainable-parameter count, final merge into plain BM8x8 layers, the
memory of the training step, and bad configs."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import losa
from salr.losa.layer import LoSALinear
from salr.losa.rmi import sparsity_delta
from salr.losa.rounds import round_warmup
from salr.train.config import TrainConfig
from salr.train.data import TokenWindows
from salr_helpers import tiny_model
from tiny_lm import VOCAB, make_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

SEQ = 32


def tiny_llama(layers: int = 4, seed: int = 0):
    return tiny_model("llama", seed=seed, layers=layers, vocab=VOCAB)


def tokens(n: int = 5000, seed: int = 1) -> torch.Tensor:
    return make_tokens(n, seed)


def config(**kw) -> "losa.LoSAConfig":
    base = dict(sparsity=0.6, rounds=3, total_steps=24, mean_rank=4, r_max=8, progress=False,
                train=TrainConfig(lr=5e-3, steps=1, batch_size=4, progress=False))
    base.update(kw)
    return losa.LoSAConfig(**base)


def _masks(model):
    return {n: m.mask().clone() for n, m in model.named_modules() if isinstance(m, LoSALinear)}


def test_run_follows_the_schedule_and_ends_as_a_plain_sparse_model():
    model = tiny_llama()
    toks = tokens()
    calib = toks[:8 * SEQ].reshape(8, SEQ)
    cfg = config()
    seen = []

    def on_round(t, m, report):
        seen.append((t, _masks(m), sum(p.numel() for p in m.parameters() if p.requires_grad)))

    report = losa.run(model, cfg, calib, TokenWindows(toks, SEQ), on_round=on_round)
    assert [r.round for r in report.rounds] == [1, 2, 3]
    targets = [0.6 - 0.6 * (1 - t / 3) ** 3 for t in (1, 2, 3)]
    assert [r.target for r in report.rounds] == pytest.approx(targets)
    for r in report.rounds:
        # Mean sparsity on target (up to Wanda's per-row rounding), every block in the δ band.
        assert sum(r.block_sparsity) / 4 == pytest.approx(r.target, abs=0.01)
        band = sparsity_delta(r.target) + 1 / 64  # + one weight per row of rounding
        prev = report.rounds[r.round - 2].block_sparsity if r.round > 1 else [0.0] * 4
        for s, p in zip(r.block_sparsity, prev):
            assert abs(s - r.target) <= band or s <= p + 1e-9  # outside the band only by not un-pruning
        assert sum(r.ranks) == 4 * 4 and all(1 <= x <= 8 for x in r.ranks)
        assert len(r.importance) == 4 and len(r.cka) == 4 and r.cka[0][0] == pytest.approx(1.0)
    # RMI actually differentiates blocks.
    assert len({round(s, 4) for s in report.rounds[-1].block_sparsity}) > 1
    # Masks only grow, round after round.
    for (_, before, _), (_, after, _) in zip(seen, seen[1:]):
        for name in before:
            assert not bool((after[name] & ~before[name]).any()), name
    # Same trainable budget every round (equal block shapes): Σ r_l·(N+K) with Σ r_l = R̄·L.
    assert len({c for _, _, c in seen}) == 1 and report.trainable_parameters == [seen[0][2]] * 3
    # Training improves the loss.
    assert report.rounds[-1].last_loss < report.rounds[0].first_loss
    # The output: plain BM8x8 layers, no adapters, no trainable parameter, on target.
    layers = [m for m in model.modules() if isinstance(m, LoSALinear)]
    assert len(layers) == 4 * 7 and all(m.rank == 0 for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    assert report.final_sparsity == pytest.approx(0.6, abs=0.01)
    for name, mask in seen[-1][1].items():  # the merge kept the last round's masks
        assert torch.equal(model.get_submodule(name).mask(), mask)


def test_final_merge_preserves_the_model_output():
    model = tiny_llama(layers=2, seed=3)
    toks = tokens(seed=4)
    calib = toks[:4 * SEQ].reshape(4, SEQ)
    cfg = config(rounds=2, total_steps=8, final_merge=False, sparsity=0.5)
    losa.run(model, cfg, calib, TokenWindows(toks, SEQ))
    layers = [m for m in model.modules() if isinstance(m, LoSALinear)]
    assert all(m.rank > 0 for m in layers)
    assert any(float(m.lora_b.detach().abs().max()) > 0 for m in layers)  # trained adapters to fold in
    ids = toks[:2 * SEQ].reshape(2, SEQ)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        bitmaps = [m.bitmap.clone() for m in layers]
        for m in layers:
            m.merge()
        after = model(input_ids=ids).logits
    assert all(torch.equal(m.bitmap, b) for m, b in zip(layers, bitmaps))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_uniform_variant_and_prune_only():
    model = tiny_llama(layers=2, seed=5)
    toks = tokens(seed=6)
    calib = toks[:4 * SEQ].reshape(4, SEQ)
    report = losa.run(model, config(rounds=1, total_steps=0, layerwise="uniform", rank_allocation="uniform",
                                        sparsity=0.5), calib, toks)
    r = report.rounds[0]
    assert r.block_sparsity == pytest.approx([0.5, 0.5]) and r.importance is None and r.first_loss is None
    assert r.ranks == [4, 4]


def test_block_cka_on_a_model():
    model = tiny_llama(layers=3, seed=7)
    calib = tokens(seed=8)[:4 * SEQ].reshape(4, SEQ)
    cka = losa.block_cka(model, calib, progress=False)
    assert cka.shape == (3, 3)
    assert torch.allclose(cka.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cka, cka.T)
    assert float(cka[0, 2]) < 0.999  # distinct blocks are not identical representations


def test_wanda_keep_prunes_per_row_inside_the_current_mask():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=gen)
    norms = torch.rand(20, generator=gen) + 0.1
    current = torch.rand(6, 20, generator=gen) > 0.3
    current[:, :7] = False  # at least 7 pruned per row already
    keep = losa.wanda_keep(w, norms, 0.5, current)
    assert not bool((keep & ~current).any())
    assert keep.sum(1).tolist() == [min(10, int(c)) for c in current.sum(1)]
    # Among the current survivors, the kept ones have the largest |W|·‖X‖.
    scores = w.abs() * norms
    for i in range(6):
        kept, dropped = scores[i][keep[i]], scores[i][current[i] & ~keep[i]]
        if kept.numel() and dropped.numel():
            assert float(kept.min()) >= float(dropped.max())


def test_training_step_saves_no_tensor_of_the_weight_size():
    """The autograd graph of a LoSA forward holds x, A, B and the layer's own buffers; nothing
    N×K-sized is created (the dense-BA approach saves several N×K tensors)."""
    n = k = 512
    w = torch.randn(n, k)
    w[torch.rand(n, k) < 0.5] = 0
    layer = LoSALinear(w, rank=4, scale=1.0)
    own = {layer.values.untyped_storage().data_ptr(), layer.bitmap.untyped_storage().data_ptr(),
           layer.offsets.untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    x = torch.randn(8, k, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    new = [numel for ptr, numel in saved if ptr not in own]
    assert max(new) <= 8 * k and sum(new) < n * k / 16
    y.sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None

    dense_saved = []
    a, b = layer.lora_a.detach().requires_grad_(), layer.lora_b.detach().requires_grad_()
    mask = (w != 0).float()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dense_saved.append(t.numel()) or t, lambda t: t):
        (x @ (w + mask * (b @ a)).T).sum()
    assert max(dense_saved) >= n * k  # the comparison point: the dense-BA graph holds N×K tensors


@pytest.mark.parametrize("kw,match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(rounds=0), "rounds"),
    (dict(delta=-0.01), "delta.*infeasible"), (dict(mean_rank=9, r_max=8), "r_max"),
    (dict(mean_rank=0), "mean_rank"), (dict(total_steps=2), "total_steps"),
    (dict(masked=False), "rank_allocation"), (dict(layerwise="x"), "layerwise"),
    (dict(train={"lr": 1}), "train"),
    (dict(final_share=1.0), "final_share"), (dict(total_steps=3, final_share=0.5), "final_share"),
    (dict(total_steps=5, train=TrainConfig(steps=10, warmup_steps=6)), "warmup_steps"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_run_checks_its_inputs():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="config"):
        losa.run(model, {"sparsity": 0.5}, torch.zeros(2, SEQ, dtype=torch.long), tokens())
    with pytest.raises(ValueError, match="calibration"):
        losa.run(model, config(), torch.zeros(2, SEQ), tokens())


def test_public_entry_points():
    from salr.losa import config, rounds

    assert salr.losa.run is rounds.run and salr.losa.LoSAConfig is config.LoSAConfig
    with pytest.raises(AttributeError):
        salr.losa.no_such_thing  # noqa: B018


def test_export_to_salr_linear_saves_and_loads_bit_for_bit(tmp_path):
    from salr.methods.salr.layer import SALRLinear

    model = tiny_llama(layers=2, seed=9)
    toks = tokens(seed=10)
    calib = toks[:4 * SEQ].reshape(4, SEQ)
    losa.run(model, config(rounds=2, total_steps=4, sparsity=0.5), calib, TokenWindows(toks, SEQ))
    ids = toks[:2 * SEQ].reshape(2, SEQ)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoSALinear)}
    bitmaps = {n: m.bitmap.clone() for n, m in layers.items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert losa.export_salr(model) == len(layers) == 14
    assert not any(isinstance(m, LoSALinear) for m in model.modules())
    for name, bitmap in bitmaps.items():
        out = model.get_submodule(name)
        assert isinstance(out, SALRLinear) and out.lora_rank == 0 and out.svd_rank == 0
        assert torch.equal(out.bitmap, bitmap)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    salr.save(model, tmp_path / "losa")
    loaded = salr.load(tmp_path / "losa")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_export_refuses_unmerged_layers():
    model = tiny_llama(layers=1, seed=11)
    toks = tokens(seed=12)
    losa.run(model, config(rounds=1, total_steps=0, sparsity=0.3, final_merge=False),
                 toks[:2 * SEQ].reshape(2, SEQ), toks)
    with pytest.raises(ValueError, match="still have adapters"):
        losa.export_salr(model)


def test_round_warmup_and_steps_follow_the_final_share():
    # The run's warmup is shared out in proportion to the rounds' steps (each round restarts AdamW).
    assert [round_warmup(6, r, 30) for r in (3, 3, 3, 3, 18)] == [1, 1, 1, 1, 4]
    assert round_warmup(0, 5, 30) == 0 and round_warmup(30, 2, 30) == 2
    model = tiny_llama(layers=2)
    toks = tokens()
    cfg = config(total_steps=10, final_share=0.6, train=TrainConfig(lr=5e-3, steps=10, warmup_steps=5,
                                                                      schedule="constant", batch_size=4,
                                                                      progress=False))
    report = losa.run(model, cfg, toks[:4 * SEQ].reshape(4, SEQ), TokenWindows(toks, SEQ))
    assert [r.steps for r in report.rounds] == [2, 2, 6]
    assert [len(r.history) for r in report.rounds] == [2, 2, 6]
    # Warmup 1, 1, 3 steps: lr = (i + 1)/warmup · lr over each round's first steps, then lr.
    lrs = [[h["lr"] for h in r.history] for r in report.rounds]
    assert lrs[0] == pytest.approx([5e-3, 5e-3]) and lrs[1] == pytest.approx([5e-3, 5e-3])
    assert lrs[2] == pytest.approx([5e-3 / 3, 1e-2 / 3, 5e-3, 5e-3, 5e-3, 5e-3])
    assert [r.first_loss for r in report.rounds] == [r.history[0]["loss"] for r in report.rounds]

