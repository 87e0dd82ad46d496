"""SALRLinear: forward against the dense reference, one fused op call, gradients only in adapters,
PEFT init, dropout, merge, state_dict round trip, Conv1D, config validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save


import salr
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.layer import SALRLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out_features=40, in_features=72, bias=True, svd_rank=6, lora_rank=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    module = SALRLinear.from_linear(linear, sparsity=0.5, criterion="magnitude", svd_rank=svd_rank,
                                    lora_rank=lora_rank, alpha=8.0, **kwargs)
    if module.lora_b is not None:
        with torch.no_grad():  # a trained-looking LoRA (B starts at zero)
            module.lora_b.normal_(0, 0.1)
    return linear, module


def _dense_reference(module: SALRLinear) -> torch.Tensor:
    """W_s + B_svd·A_svd + s·B_lora·A_lora in float64, built from the parts, not from to_dense()."""
    w = module.base_dense().double()
    if module.svd_rank:
        w = w + module.svd_b.double() @ module.svd_a.double()
    if module.lora_rank:
        w = w + (module.alpha / module.lora_rank) * (module.lora_b.double() @ module.lora_a.double())
    return w


@pytest.mark.parametrize("svd_rank,lora_rank", [(0, 0), (6, 0), (0, 4), (6, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_dense_reference(svd_rank, lora_rank, bias):
    _, module = _layer(svd_rank=svd_rank, lora_rank=lora_rank, bias=bias)
    x = torch.randn(3, 5, 72)
    ref = x.double() @ _dense_reference(module).T
    if bias:
        ref = ref + module.bias.double()
    out = module(x)
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(module.to_dense().double(), _dense_reference(module), atol=1e-6)


def test_base_is_the_pruned_weight_and_stays_compressed():
    linear, module = _layer()
    base = module.base_dense()
    assert (base == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)
    kept = base != 0
    assert torch.equal(base[kept], linear.weight.detach()[kept])
    names = set(module.state_dict())
    assert {"bitmap", "values", "offsets"} <= names and "weight" not in names
    assert module.values.numel() == 40 * 72 // 2


def test_one_fused_call_with_concatenated_adapters(monkeypatch):
    _, module = _layer(svd_rank=6, lora_rank=4)
    calls = []
    original = salr.ops.sparse_lowrank_gemm

    def spy(x, bitmap, values, offsets, n, k, a, b, bias, scales=None, frozen_adapter=None):
        calls.append((tuple(t.shape for t in frozen_adapter), a.shape, b.shape))
        return original(x, bitmap, values, offsets, n, k, a, b, bias, scales=scales, frozen_adapter=frozen_adapter)

    monkeypatch.setattr(salr.ops, "sparse_lowrank_gemm", spy)
    module.eval()
    module(torch.randn(2, 72))
    # The frozen SVD adapter and the LoRA: the op stacks them into one rank-10 product.
    assert calls == [(((6, 72), (40, 6)), (4, 72), (40, 4))]


def test_only_adapters_get_gradients():
    _, module = _layer(svd_rank=6, lora_rank=4)
    x = torch.randn(8, 72, requires_grad=True)
    module(x).square().sum().backward()
    assert module.lora_a.grad is not None and module.lora_b.grad is not None
    assert module.lora_a.grad.abs().sum() > 0 and module.lora_b.grad.abs().sum() > 0
    assert module.svd_a.grad is None and module.svd_b.grad is None
    assert not module.svd_a.requires_grad and not module.values.requires_grad
    assert x.grad is not None
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    _, trainable = _layer(svd_rank=6, lora_rank=4, trainable_svd=True)
    trainable(torch.randn(8, 72)).sum().backward()
    assert trainable.svd_a.grad is not None and trainable.svd_b.grad is not None


def test_gradients_match_dense_autograd():
    _, module = _layer(svd_rank=6, lora_rank=4, bias=False)
    x = torch.randn(8, 72, dtype=torch.float32)
    module(x).square().sum().backward()
    a = module.lora_a.detach().double().requires_grad_()
    b = module.lora_b.detach().double().requires_grad_()
    w = module.base_dense().double() + module.svd_b.double() @ module.svd_a.double()
    (x.double() @ (w + 2.0 * b @ a).T).square().sum().backward()
    assert torch.allclose(module.lora_a.grad.double(), a.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(module.lora_b.grad.double(), b.grad, rtol=1e-4, atol=1e-4)


def test_peft_init():
    linear = torch.nn.Linear(100, 30, bias=False)
    module = SALRLinear.from_linear(linear, sparsity=0.5, svd_rank=4, lora_rank=8, alpha=16)
    assert torch.all(module.lora_b == 0)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=√5) on [r, fan_in]
    assert module.lora_a.abs().max() <= bound and module.lora_a.abs().max() > 0.5 * bound
    assert module.scale == 2.0
    x = torch.randn(4, 100)
    base_and_svd = x @ (module.base_dense() + module.svd_b @ module.svd_a).T
    assert torch.allclose(module(x), base_and_svd, atol=1e-5)


def test_dropout_only_on_the_lora_branch_in_training():
    _, module = _layer(svd_rank=6, lora_rank=4, dropout=0.5)
    x = torch.randn(16, 72)
    module.eval()
    eval_out = module(x)
    module.train()
    torch.manual_seed(5)
    train_out = module(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    w = module.base_dense() + module.svd_b @ module.svd_a
    expected = x @ w.T + module.bias + module.scale * (dropped @ module.lora_a.T) @ module.lora_b.T
    assert torch.allclose(train_out, expected, atol=1e-4)
    assert not torch.allclose(train_out, eval_out, atol=1e-3)
    assert torch.allclose(eval_out, x @ module.to_dense().T + module.bias, atol=1e-4)


def test_merge_keeps_outputs_and_base():
    _, module = _layer(svd_rank=6, lora_rank=4)
    module.eval()
    x = torch.randn(6, 72)
    before = module(x)
    base = (module.bitmap.clone(), module.values.clone(), module.offsets.clone())
    module.merge()
    after = module(x)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    assert module.lora_rank == 0 and module.svd_rank == 10 and not module.svd_a.requires_grad
    assert all(torch.equal(p, q) for p, q in zip(base, (module.bitmap, module.values, module.offsets)))
    _, no_svd = _layer(svd_rank=0, lora_rank=4)
    no_svd.eval()
    before = no_svd(x)
    assert torch.allclose(no_svd.merge()(x), before, atol=1e-5)


def test_merge_refuses_non_finite():
    _, module = _layer()
    with torch.no_grad():
        module.lora_b[0, 0] = float("inf")
    with pytest.raises(ValueError, match="merge: the adapters hold NaN or inf"):
        module.merge()
    assert module.lora_rank == 4, "a refused merge leaves the module as it was"


def test_state_dict_round_trip_is_bit_exact():
    _, module = _layer(svd_rank=6, lora_rank=4)
    blob = save({k: v.contiguous() for k, v in module.state_dict().items()})
    skeleton = SALRLinear(72, 40, bias=True, svd_rank=6, lora_rank=4, alpha=8.0)
    skeleton.load_state_dict(load(blob))
    for (k1, v1), (k2, v2) in zip(module.state_dict().items(), skeleton.state_dict().items()):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2), k1
    x = torch.randn(5, 72)
    assert torch.equal(module(x), skeleton(x))
    assert skeleton.lora_a.requires_grad and not skeleton.svd_a.requires_grad


def test_bf16_module_with_fp32_input():
    _, module = _layer(dtype="bfloat16")
    assert module.values.dtype == torch.bfloat16 and module.svd_a.dtype == torch.bfloat16
    x = torch.randn(4, 72)
    out = module(x)
    assert out.dtype == torch.float32
    ref = x.double() @ _dense_reference(module).T + module.bias.double()
    assert torch.allclose(out.double(), ref, atol=0.05, rtol=0.02)


def test_conv1d_matches_linear():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(40, 72)  # nf=out, nx=in; weight [in, out]
    linear = torch.nn.Linear(72, 40)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a = SALRLinear.from_linear(conv, sparsity=0.5, svd_rank=4)
    b = SALRLinear.from_linear(linear, sparsity=0.5, svd_rank=4)
    x = torch.randn(3, 72)
    assert torch.equal(a.base_dense(), b.base_dense())
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_compile_fullgraph():
    _, module = _layer()
    module.eval()
    x = torch.randn(4, 72)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), module(x), atol=1e-6)


# ------------------------------------------------------------------------------------ bad input

def test_bad_module_arguments():
    with pytest.raises(ValueError, match=r"svd_rank: must be in \[1, min\(out_features, in_features\)\] = \[1, 40\]"):
        SALRLinear(72, 40, svd_rank=41)
    with pytest.raises(ValueError, match="lora_rank"):
        SALRLinear(72, 40, lora_rank=-1)
    with pytest.raises(ValueError, match="dropout"):
        SALRLinear(72, 40, dropout=1.0)
    with pytest.raises(ValueError, match="svd_rank"):
        SALRLinear.from_linear(torch.nn.Linear(16, 8), sparsity=0.5, svd_rank=9)
    with pytest.raises(ValueError, match="linear: expected nn.Linear"):
        SALRLinear.from_linear(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="input_rms"):
        SALRLinear.from_linear(torch.nn.Linear(16, 8), sparsity=0.5, svd_rank=2, activation_aware=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity: must be in"),
    (dict(sparsity=-0.5), "sparsity: must be in"),
    (dict(sparsity=[0.5, 1.2]), "sparsity: must be in"),
    (dict(sparsity=0.7, pattern="2:4"), "sparsity: pattern '2:4'"),
    (dict(pattern="4:4"), "pattern: '4:4' needs 0 < N < M"),
    (dict(criterion="random"), "criterion: unknown criterion"),
    (dict(group="col"), "group"),
    (dict(svd_rank=-1), "svd_rank"),
    (dict(lora_rank=1.5), "lora_rank"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(svd_method="fast"), "svd_method"),
    (dict(dtype="int8"), "dtype"),
    (dict(target_modules=[""]), "target_modules"),
    (dict(pattern="4:8", sparsity=0.5, blocksize=12), "blocksize"),
    (dict(damping=-1), "damping"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SALRConfig(**kwargs)


def test_config_round_trip_and_defaults():
    config = SALRConfig(sparsity=[0.3, 0.6], pattern=None, target_modules=["q_proj"])
    assert config.sparsity == (0.3, 0.6) and config.target_modules == ("q_proj",)
    assert SALRConfig.from_dict(config.to_dict()) == config
    assert SALRConfig(sparsity=None, pattern="2:4").sparsity == 0.5
    assert SALRConfig(criterion="magnitude").needs_calibration is False
    assert SALRConfig(criterion="magnitude", activation_aware_svd=True).needs_calibration is True
    with pytest.raises(ValueError, match="SALRConfig: unknown fields"):
        SALRConfig.from_dict({"sparsity": 0.5, "rank": 3})
