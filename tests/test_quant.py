"""The int8 rules: quantization, exact int8 GEMMs, Int8Linear, routed experts, packing."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.model.quant import (
    Int8Linear,
    RoutedExperts,
    int8_matmul,
    quantize_activation,
    quantize_weight,
    silu_mul,
)
from runtime.model.routing import RoutingRule, route_torch

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
    assert torch.equal(full, int8_matmul(qx, sx, layer.qweight_t, layer.scale))   # 200 and 96: no padding
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

CONFIGS = [  # H, I, E, n_group, topk_group, k
    (64, 32, 8, 2, 1, 2),
    (64, 32, 16, 4, 2, 4),
    (96, 48, 32, 4, 4, 8),
]


def make_layer(H, I, E, G, KG, K, seed=0):
    """(float gate_up [E, 2I, H], down [E, H, I], expert ids and weights of 64 routed tokens, x [64, H])."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(64, H, generator=g)
    logits = x @ (torch.randn(E, H, generator=g) / H**0.5).T
    rule = RoutingRule(False, False, True, E, G, KG, K, True, 2.5)
    ids, w = route_torch(logits, torch.randn(E, generator=g) * 0.05, rule)
    return gate_up, down, ids, w, x


def float64_loop(x, ids, w, gate_up, down):
    """One token and one expert at a time, in float64."""
    I = down.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    silu = torch.nn.functional.silu
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = gate_up[e].double() @ xt
            out[t] += float(w[t, j]) * (down[e].double() @ (silu(gu[:I]) * gu[I:]))
    return out


def numpy_int8_experts(x, ids, w, m):
    """Independent numpy statement of the w8a8 expert rule, in the documented op order
    (int64 GEMMs; SiLU's exp in float32 as torch's)."""
    qx, sx = numpy_quantize(x.numpy())
    out = np.zeros(x.shape, F32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            I = m.intermediate_size
            acc = (qx[t].astype(np.int64) @ m.w13_t[e].numpy().astype(np.int64)).astype(F32)
            gu = (acc * sx[t, 0]) * m.s13[e].numpy()
            g, u = gu[:I], gu[I:]
            h = g / (np.exp(-g) + F32(1)) * u
            qh, sh = numpy_quantize(h[None])
            y = (qh[0].astype(np.int64) @ m.w2_t[e].numpy().astype(np.int64)).astype(F32) * sh[0, 0] * m.s2[e].numpy()
            out[t] = out[t] + w[t, j].numpy() * y
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_int8_experts_follow_the_rule_and_stay_accurate(cfg):
    gate_up, down, ids, w, x = make_layer(*cfg)
    m = RoutedExperts.from_float(gate_up, down)
    y = m(x, ids, w)
    ref = numpy_int8_experts(x, ids, w, m)
    # The GEMMs are exact and the op order is the rule's; only exp may differ by an ulp.
    assert np.abs(y.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
    f64 = float64_loop(x, ids, w, gate_up, down)
    assert ((y.double() - f64).norm() / f64.norm()).item() < 0.03
    DeepseekV3Experts = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3").DeepseekV3Experts
    from transformers import DeepseekV3Config

    E, H, I = m.num_experts, m.hidden_size, m.intermediate_size
    hf = DeepseekV3Experts(DeepseekV3Config(n_routed_experts=E, hidden_size=H, moe_intermediate_size=I))
    with torch.no_grad():
        hf.gate_up_proj.copy_(gate_up)
        hf.down_proj.copy_(down)
        assert (hf(x, ids, w).double() - f64).abs().max().item() < 1e-4


def test_int8_experts_batch_invariant():
    gate_up, down, ids, w, x = make_layer(*CONFIGS[1], seed=5)
    m = RoutedExperts.from_float(gate_up, down)
    full = m(x, ids, w)
    g = torch.Generator().manual_seed(9)
    for T in (1, 2, 7, 33):
        rows = torch.randperm(64, generator=g)[:T]
        assert torch.equal(m(x[rows], ids[rows], w[rows]), full[rows])
        perm = torch.randperm(64, generator=g)
        assert torch.equal(m(x[perm], ids[perm], w[perm]), full[perm])


def test_expert_state_dict_round_trip_and_errors(tmp_path):
    gate_up, down, ids, w, x = make_layer(*CONFIGS[1])
    m = RoutedExperts.from_float(gate_up, down)
    save_file(m.state_dict(), tmp_path / "e.safetensors")
    m2 = RoutedExperts(16, 64, 32)
    m2.load_state_dict(load_file(tmp_path / "e.safetensors"))
    assert torch.equal(m2(x, ids, w), m(x, ids, w))
    with pytest.raises(ValueError, match="gate_up"):
        RoutedExperts.from_float(gate_up[:, :5], down)
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        m(x[:, :10], ids, w)
    with pytest.raises(ValueError, match="routing covers"):
        m(x[:3], ids, w)


def test_pack_int8_reads_float_and_int8_models_alike(tiny_checkpoint):
    """pack_int8 quantizes a float model with the rule quantize_model uses, so a float model
    and its int8 twin pack to the same codes."""
    import sdk
    from runtime.model.packing import pack_int8

    path, _ = tiny_checkpoint
    a, b = pack_int8(sdk.load_model(path)), pack_int8(sdk.load_model(path, quant="int8"))
    assert a.rule == b.rule and len(a.layers) == len(b.layers) == 3
    for la, lb in zip(a.layers, b.layers):
        for wa, wb in ((la.attn.kv_a, lb.attn.kv_a), (la.attn.o, lb.attn.o), (la.mlp.w13, lb.mlp.w13)):
            assert torch.equal(wa.q, wb.q) and torch.equal(wa.s, wb.s) and (wa.k, wa.n) == (wb.k, wb.n)
        if la.experts is not None:
            assert torch.equal(la.experts.w13, lb.experts.w13) and torch.equal(la.experts.s2, lb.experts.s2)
            assert torch.equal(la.experts.gate, lb.experts.gate) and torch.equal(la.experts.bias, lb.experts.bias)
    assert torch.equal(a.head.q, b.head.q) and torch.equal(a.embed, b.embed)
