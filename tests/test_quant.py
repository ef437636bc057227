"""int8 quantization, exact int8 GEMMs, Int8Linear and routed experts over a dispatch plan."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile

from runtime.quant import (
    Int8Linear,
    RoutedExperts,
    int8_matmul,
    quantize_activation,
    quantize_rows,
    quantize_weight,
    silu_mul,
)
from runtime.routing import Router, route_torch

F32 = np.float32


def numpy_quantize(x):
    """Independent statement of the activation rule: absmax/127, half-to-even, zero rows -> 1."""
    x = x.astype(F32)
    scale = np.abs(x).max(axis=-1, keepdims=True) / F32(127)
    scale = np.where(scale == 0, F32(1), scale).astype(F32)
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("M,K,N", [(1, 64, 32), (7, 13, 5), (33, 256, 96), (64, 1024, 48)])
def test_int8_matmul_is_exact_integer_gemm_then_elementwise_dequant(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    qx = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    qw = torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=g)
    sx = torch.rand(M, 1, generator=g) * 0.1
    sw = torch.rand(N, generator=g) * 0.01
    acc = qx.numpy().astype(np.int64) @ qw.numpy().astype(np.int64)
    ref = (acc.astype(F32) * sx.numpy()) * sw.numpy()
    got = int8_matmul(qx, sx, qw, sw)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), ref)
    out = torch.empty(M, N)
    assert int8_matmul(qx, sx, qw, sw, out=out) is out and np.array_equal(out.numpy(), ref)


def test_quantize_activation_rule():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -127.0], [0.0] * 8, [1e-3, -2e-3] + [0.0] * 6])
    q, s = quantize_activation(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q[0].tolist() == [127, 2, 4, -2, 0, 0, 2, -127]  # half to even
    assert s[1, 0] == 1.0 and (q[1] == 0).all()
    assert q[2, 1] == -127
    rng = np.random.default_rng(0)
    xr = (rng.standard_normal((50, 300)) * rng.uniform(1e-3, 1e3, (50, 1))).astype(F32)
    qn, sn = numpy_quantize(xr)
    qt, st = quantize_activation(torch.from_numpy(xr))
    assert np.array_equal(qt.numpy(), qn) and np.array_equal(st.numpy(), sn)
    qb, sb = np.empty_like(qn), np.empty(50, F32)
    quantize_rows(xr, qb, sb)  # the Numba twin used by the expert kernels
    assert np.array_equal(qb, qn) and np.array_equal(sb, sn[:, 0])


def test_quantize_weight_per_channel_and_padding():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 13, generator=g)
    w[2] = 0
    qt, s = quantize_weight(w)
    assert qt.shape == (13, 5) and qt.dtype == torch.int8 and qt.is_contiguous() and s.shape == (5,)
    assert s[2] == 1 and (qt[:, 2] == 0).all()
    assert torch.equal(s[[0, 1, 3, 4]], w[[0, 1, 3, 4]].abs().amax(1) / 127)
    assert (qt.float().t() * s[:, None] - w).abs().le(s[:, None] / 2 + 1e-7).all()
    qp, sp = quantize_weight(w, align=8)
    assert qp.shape == (16, 8) and sp.shape == (8,)
    assert torch.equal(qp[:13, :5], qt) and (qp[13:] == 0).all() and (qp[:, 5:] == 0).all()


def test_int8_linear_batch_invariant_accurate_and_loadable(tmp_path):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 200, generator=g) / 200**0.5
    layer = Int8Linear.from_float(w)
    x = torch.randn(64, 200, generator=g)
    full = layer(x)
    for M in (1, 2, 7, 33, 64):
        assert torch.equal(layer(x[:M]), full[:M])
    perm = torch.randperm(64, generator=g)
    assert torch.equal(layer(x[perm]), full[perm])
    assert torch.equal(layer(x.view(4, 16, 200)), full.view(4, 16, 96))
    qx, sx = quantize_activation(x)
    assert torch.equal(full, int8_matmul(qx, sx, layer.qweight_t, layer.scale))  # CPU kernels = torch ops
    ref = x @ w.T
    assert ((full - ref).norm() / ref.norm()).item() < 0.02
    w8 = Int8Linear.from_float(w, mode="w8")(x)
    assert ((w8 - ref).norm() / ref.norm()).item() < ((full - ref).norm() / ref.norm()).item()
    assert torch.equal(w8, x @ layer.dequantized_weight().T)

    odd = Int8Linear.from_float(torch.randn(5, 13, generator=g))  # padded to 8 x 16 inside
    save_file(odd.state_dict(), tmp_path / "l.safetensors")
    loaded = Int8Linear(13, 5)
    loaded.load_state_dict(load_file(tmp_path / "l.safetensors"))
    xo = torch.randn(9, 13, generator=g)
    assert loaded(xo).shape == (9, 5) and torch.equal(loaded(xo), odd(xo))
    qo, so = quantize_activation(xo)
    assert torch.equal(odd(xo), int8_matmul(torch.nn.functional.pad(qo, (0, 3)), so, odd.qweight_t, odd.scale)[:, :5])
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(4, 4, mode="w4")


def test_silu_mul_is_position_independent():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 1001, generator=g) * 4, torch.randn(9, 1001, generator=g)
    full = silu_mul(a, b)
    rows = torch.cat([silu_mul(a[i : i + 1, j : j + 7], b[i : i + 1, j : j + 7]) for i in range(9) for j in range(0, 1001, 7)])
    assert torch.equal(full.reshape(-1), rows.reshape(-1))
    torch.testing.assert_close(full, torch.nn.functional.silu(a) * b, rtol=1e-6, atol=1e-6)


# --- routed experts ---------------------------------------------------------------------

CONFIGS = [  # H, I, E, n_group, topk_group, k, shared intermediate (0: none)
    (64, 32, 8, 2, 1, 2, 0),
    (64, 32, 16, 4, 2, 4, 32),
    (96, 48, 32, 4, 4, 8, 96),
]


def make_layer(H, I, E, G, KG, K, Is, seed=0, max_tokens=64):
    """(routed weights, shared weights or None, router, x [64, H]) for a random layer."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    shared = None
    if Is:
        shared = (torch.randn(Is, H, generator=g) / H**0.5, torch.randn(Is, H, generator=g) / H**0.5,
                  torch.randn(H, Is, generator=g) / Is**0.5)  # fmt: skip
    router = Router(torch.randn(E, H, generator=g) / H**0.5, torch.randn(E, generator=g) * 0.05,
                    G, KG, K, True, 2.5, max_tokens)  # fmt: skip
    x = torch.randn(64, H, generator=g)
    return (gate, up, down), shared, router, x


def build(weights, shared, **kw):
    return RoutedExperts.from_float(*weights, shared=shared, **kw)


def float64_loop(x, plan, weights, shared):
    """One token and one expert at a time, in float64; the shared expert added last."""
    gate, up, down = weights
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    silu = torch.nn.functional.silu
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(plan.topk_idx.shape[1]):
            e = int(plan.topk_idx[t, j])
            h = silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            out[t] += float(plan.topk_weight[t, j]) * (down[e].double() @ h)
        if shared is not None:
            sg, su, sd = (w.double() for w in shared)
            out[t] += sd @ (silu(sg @ xt) * (su @ xt))
    return out


def numpy_int8_mlp(qx_t, sx_t, w13, s13, w2, s2):
    """One token through one int8 expert: the documented rule in numpy (int64 GEMMs)."""
    I = s13.shape[0] // 2
    acc = (qx_t.astype(np.int64) @ w13.astype(np.int64)).astype(F32)
    gu = (acc * sx_t) * s13
    g, u = gu[:I], gu[I:]
    h = g / (np.exp(-g.astype(np.float64)).astype(F32) + F32(1)) * u
    qh, sh = numpy_quantize(h[None])
    return ((qh[0].astype(np.int64) @ w2.astype(np.int64)).astype(F32) * sh[0, 0]) * s2


def numpy_int8_experts(x, plan, m):
    """Independent numpy statement of the w8a8 expert layer, in the documented op order."""
    qx, sx = numpy_quantize(x.numpy())
    out = np.zeros(x.shape, F32)
    for t in range(x.shape[0]):
        for j in range(plan.topk_idx.shape[1]):
            e = plan.topk_idx[t, j]
            y = numpy_int8_mlp(qx[t], sx[t, 0], m.w13_t[e].numpy(), m.s13[e].numpy(), m.w2_t[e].numpy(), m.s2[e].numpy())
            out[t] += plan.topk_weight[t, j] * y
        if m.shared_intermediate_size:
            out[t] += numpy_int8_mlp(qx[t], sx[t, 0], m.shared_w13_t.numpy(), m.shared_s13.numpy(),
                                     m.shared_w2_t.numpy(), m.shared_s2.numpy())  # fmt: skip
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_float_experts_match_per_token_loop_and_transformers(cfg):
    H, I, E, G, KG, K, Is = cfg
    weights, shared, router, x = make_layer(*cfg)
    gate, up, down = weights
    plan = router(x.numpy())
    full = build(weights, shared, mode="float")(x, plan)
    assert (full.double() - float64_loop(x, plan, weights, shared)).abs().max().item() < 1e-5
    routed = build(weights, None, mode="float")(x, plan)
    DeepseekV3Experts = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3").DeepseekV3Experts
    from transformers import DeepseekV3Config

    hf = DeepseekV3Experts(DeepseekV3Config(n_routed_experts=E, hidden_size=H, moe_intermediate_size=I))
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        hf.down_proj.copy_(down)
        hf_out = hf(x, torch.from_numpy(plan.topk_idx).long(), torch.from_numpy(plan.topk_weight))
    assert (routed - hf_out).abs().max().item() < 1e-5


@pytest.mark.parametrize("cfg", CONFIGS)
def test_int8_experts_exact_rule_backends_and_accuracy(cfg):
    weights, shared, router, x = make_layer(*cfg)
    plan = router(x.numpy())
    numba_only = build(weights, shared, backend="numba", min_mm_rows=1 << 30)
    y = numba_only(x, plan).clone()
    assert np.array_equal(y.numpy(), numpy_int8_experts(x, plan, numba_only))
    for mr in (1, 2, 3):  # groups with >= mr rows go through torch._int_mm: same bits
        hybrid = build(weights, shared, backend="numba", min_mm_rows=mr)
        assert torch.equal(hybrid(x, plan), y)
    tb = build(weights, shared, backend="torch")(x, plan)
    assert (tb - y).abs().max().item() <= 1e-4 * y.abs().max().item()  # SiLU's exp may differ by an ulp
    # Plans of tensors (as route_torch returns, int64 indices) run the same numba kernels.
    as_tensors = plan._replace(**{
        f: torch.from_numpy(getattr(plan, f)).to(torch.int64 if getattr(plan, f).dtype == np.int32 else torch.float32)
        for f in plan._fields[:-1]
    })  # fmt: skip
    assert torch.equal(numba_only(x, as_tensors), y)
    tplan = route_torch(torch.from_numpy(router.logits[:64]), torch.from_numpy(router.bias), *cfg[3:6], True, 2.5)
    assert (numba_only(x, tplan) - y).abs().max().item() <= 1e-4 * y.abs().max().item()
    ref = float64_loop(x, plan, weights, shared)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel


@pytest.mark.parametrize("backend,mr", [("numba", 1 << 30), ("numba", 2), ("torch", None)])
def test_int8_experts_batch_invariant(backend, mr):
    weights, shared, router, x = make_layer(*CONFIGS[1], seed=5)
    m = build(weights, shared, backend=backend, min_mm_rows=mr)
    full = m(x, router(x.numpy())).clone()
    g = torch.Generator().manual_seed(9)
    for T in (1, 2, 7, 33):
        rows = torch.randperm(64, generator=g)[:T]
        others = torch.randn(64 - T, x.shape[1], generator=g)
        batch = torch.cat([x[rows], others])[torch.randperm(64, generator=g)]
        where = [int((batch == x[r]).all(1).nonzero()[0]) for r in rows]
        out = m(batch, router(batch.numpy()))
        assert torch.equal(out[where], full[rows])
        alone = m(x[rows], router(x[rows].numpy()))
        assert torch.equal(alone, full[rows])


def allocated_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("mr", [1 << 30, 2])
def test_int8_experts_steady_state_allocates_nothing(mr):
    weights, shared, router, x = make_layer(*CONFIGS[1], seed=6)
    m = build(weights, shared, backend="numba", min_mm_rows=mr)
    m.reserve(64, CONFIGS[1][5])
    plan = router(x[:33].numpy())
    first = m(x[:33], plan)
    ptr, val = first.data_ptr(), first.clone()
    assert allocated_bytes(lambda: m(x[:33], plan)) == 0
    again = m(x[:33], plan)
    assert again.data_ptr() == ptr and torch.equal(again, val)
    torch_backend = build(weights, shared, backend="torch")
    assert allocated_bytes(lambda: torch_backend(x[:33], plan)) > 0  # the profiler does see allocations


def test_expert_state_dict_round_trip_and_errors(tmp_path):
    weights, shared, router, x = make_layer(*CONFIGS[1])
    m = build(weights, shared)
    save_file(m.state_dict(), tmp_path / "e.safetensors")
    m2 = RoutedExperts(16, 64, 32, shared_intermediate_size=32)
    m2.load_state_dict(load_file(tmp_path / "e.safetensors"))
    plan = router(x.numpy())
    assert torch.equal(m2(x, plan), m(x, plan))
    gate, up, down = weights
    with pytest.raises(ValueError, match="gate/up"):
        RoutedExperts.from_float(gate, up[:, :5], down)
    with pytest.raises(ValueError, match="shared expert"):
        RoutedExperts.from_float(gate, up, down, shared=(shared[0], shared[1], shared[2].T))
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        m(x[:, :10], plan)
    with pytest.raises(ValueError, match="plan covers"):
        m(x[:3], plan)
    with pytest.raises(ValueError, match="numba backend"):
        RoutedExperts(8, 64, 32, mode="float", backend="numba")
