"""MoEFFN: sparse dispatch vs the run-every-expert oracle, upcycling, balance/z losses, usage, gradients."""

import math

import pytest
import torch
from torch import nn

from dset.analytic import moe_ffn_macs_per_token
from dset.models.moe import MoEFFN, dense_moe_forward


@pytest.fixture(params=["padded", "loop"])
def dispatch(request, monkeypatch):
    """Run a test under each CPU dispatch path: the padded all-experts bmm and the per-expert loop."""
    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "0")
    monkeypatch.setattr(MoEFFN, "pad_waste_limit", float("inf") if request.param == "padded" else 0.0)
    return request.param


def _spread_router(m: MoEFFN, std: float = 0.5) -> MoEFFN:
    with torch.no_grad():
        m.router.weight.normal_(0.0, std)
    return m


def _dense_ffn(d, h, act):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU() if act == "relu" else nn.GELU(), nn.Linear(h, d))


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("shape", [(37, 16), (3, 11, 16)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("E,k", [(4, 1), (5, 2), (6, 3)])
def test_sparse_matches_dense_all_oracle(shape, activation, E, k, dispatch):
    m = _spread_router(MoEFFN(16, 24, E, k, activation=activation)).eval()
    x = torch.randn(*shape)
    y = m(x)
    assert m.last_dispatch == dispatch
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense_moe_forward(m, x), atol=1e-5, rtol=0)
    # several experts really are used and the weights matter (the output is not a single expert's)
    assert (m.usage > 0).sum() >= min(E, 2)


def test_oracle_is_a_per_token_top_k_mixture(dispatch):
    """Check the oracle itself against an explicit per-token loop (slow but obviously right)."""
    m = _spread_router(MoEFFN(8, 12, 4, 2, activation="gelu")).eval()
    x = torch.randn(9, 8)
    probs = m.router(x).softmax(-1)
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = probs[t].topk(2)
        w = w / w.sum()
        for wj, e in zip(w, idx):
            h = torch.nn.functional.gelu(m.w1[e] @ x[t] + m.b1[e])
            ref[t] += wj * (m.w2[e] @ h + m.b2[e])
    torch.testing.assert_close(dense_moe_forward(m, x), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_no_grad_path_equals_autograd_path(activation, dispatch):
    m = _spread_router(MoEFFN(16, 24, 5, 2, activation=activation)).eval()
    x = torch.randn(2, 13, 16)
    y_grad = m(x)
    with torch.inference_mode():
        y_inf = m(x)
    torch.testing.assert_close(y_inf, y_grad, atol=0, rtol=0)


def test_grouped_mm_path_equals_loop_path(monkeypatch):
    if getattr(torch, "_grouped_mm", None) is None:
        pytest.skip("torch._grouped_mm not available")
    m = _spread_router(MoEFFN(16, 24, 5, 2, activation="gelu")).eval()
    x = torch.randn(2, 13, 16)
    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "0")
    monkeypatch.setattr(MoEFFN, "pad_waste_limit", 0.0)
    y_loop = m(x)
    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "1")
    try:
        y_gmm = m(x)
    except RuntimeError as err:  # op present but not implemented for this device/dtype
        pytest.skip(f"torch._grouped_mm unusable here: {err}")
    assert m.last_dispatch == "grouped_mm"
    torch.testing.assert_close(y_gmm, y_loop, atol=1e-5, rtol=0)
    # gradients through the grouped path match the loop's
    g = torch.randn_like(y_loop)
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DSET_MOE_GROUPED_MM", flag)
        m.zero_grad()
        (m(x) * g).sum().backward()
        grads[flag] = [p.grad.clone() for p in (m.w1, m.b1, m.w2, m.b2, m.router.weight)]
    for a, b in zip(grads["0"], grads["1"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dispatch_choice_follows_pad_waste_limit(monkeypatch):
    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "0")
    m = MoEFFN(8, 8, 4, 1).eval()
    calls = []
    monkeypatch.setattr(m, "_experts_padded",
                        lambda xp: calls.append(("padded", tuple(xp.shape)))
                        or xp.new_zeros(xp.shape[0] * xp.shape[1], 8))
    monkeypatch.setattr(m, "_experts_loop",
                        lambda xs, c: calls.append(("loop", tuple(c))) or xs.new_zeros(xs.shape[0], 8))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # every token to expert 0: cap = T
    x = torch.randn(10, 8)
    m(x)  # padding to 4 * 10 rows for 10 slots = 4x waste > 1.5
    m.pad_waste_limit = 4.0
    m(x)
    assert calls == [("loop", (10, 0, 0, 0)), ("padded", (4, 10, 8))]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_top_k_equals_num_experts_with_identical_experts_is_dense_ffn(activation, dispatch):
    dense = _dense_ffn(16, 32, activation)
    m = MoEFFN(16, 32, 4, 4, activation=activation)
    with torch.no_grad():
        m.w1.copy_(dense[0].weight.expand_as(m.w1))
        m.b1.copy_(dense[0].bias.expand_as(m.b1))
        m.w2.copy_(dense[2].weight.expand_as(m.w2))
        m.b2.copy_(dense[2].bias.expand_as(m.b2))
    _spread_router(m, 1.0)
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(m.eval()(x), dense(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.usage, torch.full((4,), 0.25))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_upcycled_zero_noise_equals_dense(activation, dispatch):
    # plain upcycling's property, and why it is not the presets' choice: whatever the routing the layer is the dense
    # FFN, so its router gets no task gradient (tests/test_moe_learning.py)
    dense = _dense_ffn(16, 32, activation)
    m = MoEFFN.from_dense(dense[0], dense[2], num_experts=6, top_k=3, activation=activation,
                          router_noise=0.3)
    x = torch.randn(3, 20, 16)
    torch.testing.assert_close(m.eval()(x), dense(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.train()(x), dense(x), atol=1e-5, rtol=0)  # router noise too
    assert torch.equal(m.w1[5], dense[0].weight) and torch.equal(m.b2[2], dense[2].bias)
    assert m.router.weight.abs().max() < 0.1 and torch.all(m.router.bias == 0)


def test_upcycled_with_noise_differs_per_expert():
    dense = _dense_ffn(16, 32, "relu")
    m = MoEFFN.from_dense(dense[0], dense[2], 4, 2, noise_std=0.1, generator=torch.Generator().manual_seed(1))
    rel = (m.w1 - dense[0].weight).std() / dense[0].weight.std()
    assert 0.07 < rel < 0.13  # relative noise std ~ 0.1
    assert not torch.equal(m.w1[0], m.w1[1])
    x = torch.randn(5, 16)
    assert not torch.allclose(m.eval()(x), dense(x), atol=1e-4)


def test_upcycle_shape_mismatch_raises():
    with pytest.raises(ValueError, match="hidden_dim"):
        MoEFFN(16, 24, 4, 2).upcycle_from_dense(nn.Linear(16, 32), nn.Linear(32, 16))


# ----------------------------------------------------------------------------- losses, usage
def _cyclic_router(E: int, scale: float = 10.0) -> MoEFFN:
    """d_model == E, router = scale * identity, zero bias: token e_i routes to expert i."""
    m = MoEFFN(E, 8, E, 2)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(E) * scale)
        m.router.bias.zero_()
    return m.eval()


def test_balance_loss_is_one_for_uniform_routing():
    E, reps = 4, 3
    m = _cyclic_router(E)
    eye = torch.eye(E)
    # token i prefers expert i (logit 10), then expert i+1 (logit 5): top-2 = {i, i+1}
    x = torch.cat([eye + 0.5 * eye.roll(1, dims=1)] * reps)  # [E*reps, E]
    m(x)
    torch.testing.assert_close(m.usage, torch.full((E,), 1.0 / E))
    # every expert: f_i = 1/E, and by symmetry P_i = 1/E  ->  E * sum(1/E * 1/E) = 1
    torch.testing.assert_close(m.balance_loss, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_balance_loss_for_collapsed_routing_is_E_over_k():
    E, k = 4, 2
    m = MoEFFN(8, 8, E, k).eval()
    bias = torch.tensor([10.0, 10.0, -10.0, -10.0])
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.copy_(bias)
    m(torch.randn(7, 8))
    p = bias.softmax(0)
    # f = [1/2, 1/2, 0, 0]; P = softmax(bias) for every token
    expected = E * (0.5 * p[0] + 0.5 * p[1])
    torch.testing.assert_close(m.balance_loss, expected)
    assert abs(m.balance_loss.item() - E / k) < 1e-6
    torch.testing.assert_close(m.usage, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    lse = math.log(2 * math.exp(10) + 2 * math.exp(-10))
    torch.testing.assert_close(m.z_loss, torch.tensor(lse**2))


def test_z_loss_and_usage_by_hand():
    m = _spread_router(MoEFFN(16, 8, 5, 2)).eval()
    x = torch.randn(2, 9, 16)
    m(x)
    logits = m.router(x.reshape(-1, 16))
    torch.testing.assert_close(m.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    top = logits.topk(2, dim=-1).indices.reshape(-1)
    torch.testing.assert_close(m.usage, torch.bincount(top, minlength=5).float() / top.numel())
    assert abs(m.usage.sum().item() - 1.0) < 1e-6
    assert not m.usage.requires_grad
    probs = logits.softmax(-1)
    torch.testing.assert_close(m.balance_loss, 5 * (m.usage * probs.mean(0)).sum())


def test_empty_input(dispatch):
    m = MoEFFN(16, 8, 4, 2)
    y = m(torch.randn(0, 16))
    assert y.shape == (0, 16)
    assert m.balance_loss.item() == 0.0 and m.z_loss.item() == 0.0


# ----------------------------------------------------------------------------- gradients
def test_gradients_match_oracle_and_reach_router_and_used_experts(dispatch):
    E = 5
    m = MoEFFN(16, 24, E, 2, activation="gelu").train()
    with torch.no_grad():
        m.router.weight.normal_(0.0, 0.5)
        m.router.bias.copy_(torch.tensor([3.0, 3.0, 3.0, -30.0, -30.0]))  # experts 3, 4 unused
    x = torch.randn(2, 15, 16, requires_grad=True)
    g_out = torch.randn(2, 15, 16)

    (m(x) * g_out).sum().backward()
    sparse = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx = x.grad.clone()
    usage = m.usage.clone()
    m.zero_grad()
    x.grad = None
    (dense_moe_forward(m, x) * g_out).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)

    assert sparse["router.weight"].abs().sum() > 0
    assert torch.all(usage[:3] > 0) and torch.all(usage[3:] == 0)
    for e in range(E):
        for name in ("w1", "b1", "w2", "b2"):
            nonzero = sparse[name][e].abs().sum() > 0
            assert bool(nonzero) == (e < 3), (name, e)


def test_balance_and_z_loss_have_router_gradients():
    m = _spread_router(MoEFFN(16, 8, 4, 2)).train()
    m(torch.randn(20, 16))
    (m.balance_loss + m.z_loss).backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.w1.grad is None  # the aux losses touch only the router


def test_router_noise_only_in_training():
    m = _spread_router(MoEFFN(16, 24, 6, 2, router_noise=2.0))
    x = torch.randn(40, 16)
    m.eval()
    y_eval = m(x)
    torch.testing.assert_close(m(x), y_eval, atol=0, rtol=0)
    torch.testing.assert_close(y_eval, dense_moe_forward(m, x), atol=1e-5, rtol=0)
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(2)
    y2 = m(x)
    assert not torch.allclose(y1, y_eval, atol=1e-4)
    assert not torch.allclose(y1, y2, atol=1e-4)
    # the z-loss is taken on the noise-free logits
    torch.testing.assert_close(m.z_loss, torch.logsumexp(m.router(x), -1).pow(2).mean())
    # train mode without noise is deterministic and equals eval
    m.router_noise = 0.0
    torch.testing.assert_close(m(x), y_eval, atol=0, rtol=0)


def test_dropout_on_hidden_activation_in_training_only(dispatch):
    m = _spread_router(MoEFFN(16, 24, 4, 2, dropout=0.5))
    x = torch.randn(30, 16)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_eval, dense_moe_forward(m, x), atol=1e-5, rtol=0)
    assert not torch.allclose(m.train()(x), y_eval, atol=1e-4)


# ----------------------------------------------------------------------------- accounting, args
def test_flops_per_token():
    m = MoEFFN(256, 1024, 6, 3)
    assert m.flops_per_token() == 256 * 6 + 3 * 2 * 256 * 1024 == moe_ffn_macs_per_token(256, 1024, 6, 3)


def test_parameter_shapes_and_xavier_init():
    m = MoEFFN(16, 32, 3, 1)
    assert m.w1.shape == (3, 32, 16) and m.b1.shape == (3, 32)
    assert m.w2.shape == (3, 16, 32) and m.b2.shape == (3, 16)
    bound = math.sqrt(6 / (16 + 32))   # xavier-uniform per expert slice (the original DSET's experts)
    assert m.w1.abs().max() <= bound + 1e-6 and m.w2.abs().max() <= bound + 1e-6
    assert not torch.equal(m.w1[0], m.w1[1])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, top_k=0), "top_k"),
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(num_experts=4, top_k=2, activation="swish"), "activation"),
        (dict(num_experts=4, top_k=2, dropout=1.5), "dropout"),
        (dict(num_experts=4, top_k=2, router_noise=-1.0), "router_noise"),
    ],
)
def test_invalid_args(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        MoEFFN(16, 32, **kwargs)
    value = kwargs.get(name)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fvcore_counts_every_dispatch_path(activation, dispatch):
    fvcore = pytest.importorskip("fvcore.nn")
    from dset.models.moe_flops import fvcore_op_handles

    T, d, H, E, k = 24, 16, 32, 4, 2
    m = _spread_router(MoEFFN(d, H, E, k, activation=activation)).eval()
    x = torch.randn(1, T, d)
    with torch.no_grad():
        m(x)
        counts = (m.usage * T * k).round().long().tolist()
        fca = fvcore.FlopCountAnalysis(m, x).set_op_handle(**fvcore_op_handles())
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = fca.total()
    rows = E * max(counts) if dispatch == "padded" else T * k  # padded path also computes the padding
    expected = T * d * E + rows * 2 * d * H + T * k * d  # router + experts + weighted combine
    assert total == expected


def test_cpu_autocast_bf16_runs_and_is_close(dispatch):
    m = _spread_router(MoEFFN(16, 32, 4, 2, activation="gelu")).eval()
    x = torch.randn(2, 9, 16)
    ref = m(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_bench_cli_prints_one_json_object_per_token_count(capsys):
    import json

    from dset.bench import main

    assert main(["moe", "--json", "--tokens", "8", "24", "--repeats", "1", "--warmup", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["tokens"] for r in lines] == [8, 24]
    for r in lines:
        for key in ("sparse_ms", "dense_all_ms", "matched_ffn_ms", "sparse_vs_matched", "sparse_vs_dense_all",
                    "device", "threads", "dispatch", "other_cpu_share"):
            assert key in r, key
        assert r["sparse_vs_matched"] == pytest.approx(r["sparse_ms"] / r["matched_ffn_ms"], rel=0.1)
