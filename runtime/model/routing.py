"""The routing rule of DeepSeek MoE layers, defined once, and its two implementations.

The rule, for one token with router logits ``l = x @ W.T`` (float32, E experts in
``n_group`` equal groups of consecutive ids):

    scores   s = sigmoid(l)                         scoring "sigmoid" (DeepSeek-V3/R1)
             s = softmax(l) over the E experts      scoring "softmax" (DeepSeek-V2 family)
    choice   c = s + e_score_correction_bias        (noaux_tc; c = s without a bias)
    groups   score of a group = the sum of its two largest c (noaux_tc)
                              = its largest c (group_limited_greedy)
             keep the ``topk_group`` best groups (greedy: every expert is one group)
    experts  the ``top_k`` largest c among the experts of the kept groups
    weights  s at the chosen experts, divided by (their sum + 1e-20) if ``norm_topk_prob``,
             times ``routed_scaling_factor``

Ties go to the lower index (group and expert). Chosen ids are returned ascending, and a
token's expert outputs are summed in that order. :class:`RoutingRule` holds the rule's
parameters, read from a ``ModelConfig`` (it lives beside it in :mod:`runtime.model.config`, which
needs neither torch nor Numba, and is re-exported here).

Arithmetic, shared by both implementations: sigmoid is ``1 / (1 + exp(-l))`` with ``exp``
taken in float64 and rounded to float32; softmax is ``exp(l - max l)`` the same way, over
their float32 sum; the weight sum runs over the chosen experts in ascending id.

The implementations, side by side:

- :func:`route_torch`: torch ops at static shapes with no host synchronisation (the
  reference model and the device engine, graph-capturable on CUDA). ``topk`` runs on
  integer keys that are all distinct, so its own tie order never matters.
- :func:`route_dispatch` (Numba, with :func:`router_logits`): the CPU engine's, fused with
  the expert-major dispatch plan so experts run once each over their tokens. Its router
  logits are summed in one fixed order, so a token's routing never depends on the batch.
  :class:`Router` wraps both with preallocated buffers.

From the same logits both give the same experts; with sigmoid scoring the same weight bits
too (a test holds them to it); with softmax the weights may differ in the last bit, since
the softmax denominator is summed in a different order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import njit

from runtime.model.config import RoutingRule

if TYPE_CHECKING:                                        # torch is imported where the torch rule runs
    import torch

_KEY_BITS = 16  # room for an index in a torch routing key (E, n_group < 65536)


# ---------------------------------------------------------------------------------------
# torch implementation


def _order_key(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like float32 ``x`` and, among equal values, higher for a lower index."""
    import torch

    bits = (x + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << _KEY_BITS) | ((1 << _KEY_BITS) - 1 - index)


def scores_torch(logits: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """Routing scores ``s`` of float32 logits [T, E] (sigmoid or softmax, as the rule says)."""
    import torch

    if rule.softmax:
        e = torch.exp((logits - logits.amax(-1, keepdim=True)).double()).float()
        return e / e.sum(-1, keepdim=True)
    return 1.0 / (1.0 + torch.exp(-logits.double()).float())


def route_torch(logits: torch.Tensor, bias: torch.Tensor | None,
                rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on float32 logits [T, E] -> (expert ids int64 [T, k] ascending, weights
    float32 [T, k]); static shapes, no host synchronisation, any device."""
    import torch

    T, E = logits.shape
    scores = scores_torch(logits, rule)
    choice = scores + bias if rule.biased else scores
    key = _order_key(choice, torch.arange(E, device=logits.device))
    if rule.n_group > 1:
        gsize = E // rule.n_group
        grouped = choice.view(T, rule.n_group, gsize)
        if rule.group_max:
            group_score = grouped.amax(-1)
        else:
            top2 = grouped.topk(2, dim=-1).values
            group_score = top2[..., 0] + top2[..., 1]
        gidx = torch.arange(rule.n_group, device=logits.device)
        keep = torch.topk(_order_key(group_score, gidx), rule.topk_group, dim=-1).indices
        group_mask = torch.zeros(T, rule.n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, rule.n_group, gsize).reshape(T, E)
        key = key.masked_fill(~expert_mask, torch.iinfo(torch.int64).min)
    ids = torch.topk(key, rule.top_k, dim=-1).indices.sort(dim=-1).values
    w = scores.gather(1, ids)
    if rule.norm_topk_prob:
        total = w[:, 0]
        for j in range(1, rule.top_k):
            total = total + w[:, j]
        w = w / (total + 1e-20).unsqueeze(1)
    return ids, w * rule.scaling


# ---------------------------------------------------------------------------------------
# Numba implementation


@njit(cache=True, error_model="numpy", nogil=True)
def router_logits(x, weight_t, out):
    """Router logits ``out[t, e] = sum_j x[t, j] * weight_t[j, e]`` in a fixed order.

    ``x`` float32 [T, H], ``weight_t`` float32 [H, E] (the router weight transposed,
    contiguous), ``out`` float32 [T, E]. For each logit the products are added in groups
    of eight consecutive ``j`` as a balanced tree ``((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7))``,
    each group added to the running sum in ascending ``j``; the last ``H % 8`` products
    are then added one by one. No fused multiply-add is used. The order depends on ``H``
    only, so a token's logits are bitwise identical whatever ``T`` is and whatever the
    other rows hold. The code vectorises across experts, never across ``j``, so SIMD does
    not change the order either.
    """
    T, H = x.shape
    E = weight_t.shape[1]
    H8 = H - H % 8
    for t in range(T):
        for e in range(E):
            out[t, e] = 0.0
    # j-outer: a block of eight weight rows is read once for all tokens.
    for j in range(0, H8, 8):
        w0 = weight_t[j]
        w1 = weight_t[j + 1]
        w2 = weight_t[j + 2]
        w3 = weight_t[j + 3]
        w4 = weight_t[j + 4]
        w5 = weight_t[j + 5]
        w6 = weight_t[j + 6]
        w7 = weight_t[j + 7]
        for t in range(T):
            o = out[t]
            xr = x[t]
            x0 = xr[j]
            x1 = xr[j + 1]
            x2 = xr[j + 2]
            x3 = xr[j + 3]
            x4 = xr[j + 4]
            x5 = xr[j + 5]
            x6 = xr[j + 6]
            x7 = xr[j + 7]
            for e in range(E):
                o[e] += ((x0 * w0[e] + x1 * w1[e]) + (x2 * w2[e] + x3 * w3[e])) + (
                    (x4 * w4[e] + x5 * w5[e]) + (x6 * w6[e] + x7 * w7[e])
                )
    for j in range(H8, H):
        wj = weight_t[j]
        for t in range(T):
            o = out[t]
            xj = x[t, j]
            for e in range(E):
                o[e] += xj * wj[e]


class RouteBuffers(NamedTuple):
    """Scratch and outputs of :func:`route_dispatch` for up to T tokens of k experts among E.

    Scratch (overwritten): ``scores``, ``choice`` float32 [E]; ``group_score`` float32
    [n_group]; ``group_keep`` uint8 [n_group]; ``sel_val`` float32 [k]; ``sel_idx`` int32
    [k]; ``cursor`` int32 [E]. Outputs (the dispatch plan):
    - ``topk_idx`` int32 [T, k]: chosen experts, ascending within a token;
    - ``topk_weight`` float32 [T, k]: their weights, same order;
    - ``topk_pos`` int32 [T, k]: where each assignment sits in the dispatch order;
    - ``counts`` int32 [E]: tokens per expert; ``offsets`` int32 [E+1]: prefix sums;
    - ``token_ids`` int32 [T*k], ``token_weights`` float32 [T*k]: the assignments in
      expert-major order (a counting sort, stable by token), so expert ``e`` serves
      ``token_ids[offsets[e]:offsets[e+1]]``;
    - ``active`` int32 [E]: the experts with at least one token, ascending.
    """

    scores: np.ndarray
    choice: np.ndarray
    group_score: np.ndarray
    group_keep: np.ndarray
    sel_val: np.ndarray
    sel_idx: np.ndarray
    cursor: np.ndarray
    topk_idx: np.ndarray
    topk_weight: np.ndarray
    topk_pos: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    token_weights: np.ndarray
    active: np.ndarray

    @classmethod
    def allocate(cls, rule: RoutingRule, max_tokens: int) -> "RouteBuffers":
        """Buffers for up to ``max_tokens`` tokens of ``rule``."""
        E, G, k, T = rule.n_experts, rule.n_group, rule.top_k, max_tokens
        f32, i32 = np.float32, np.int32
        return cls(np.zeros(E, f32), np.zeros(E, f32), np.zeros(G, f32), np.zeros(G, np.uint8),
                   np.zeros(k, f32), np.zeros(k, i32), np.zeros(E, i32), np.zeros((T, k), i32),
                   np.zeros((T, k), f32), np.zeros((T, k), i32), np.zeros(E, i32), np.zeros(E + 1, i32),
                   np.zeros(T * k, i32), np.zeros(T * k, f32), np.zeros(E, i32))


@njit(cache=True, error_model="numpy", nogil=True, inline="always")
def _exp32(v):
    """exp of a float32 taken in float64 and rounded to float32 (the rule's ``exp``)."""
    return np.float32(math.exp(np.float64(v)))


@njit(cache=True, error_model="numpy", nogil=True)
def route_dispatch(logits, bias, rule, buf):
    """The rule over ``logits`` float32 [T, E] and the expert-major dispatch plan, in one call.

    ``bias`` float32 [E] (read only when ``rule.biased``); ``rule`` a :class:`RoutingRule`;
    ``buf`` :class:`RouteBuffers` for at least T tokens, written, nothing allocated.
    Returns the number of active experts. NaN scores never produce an out-of-range index (a
    NaN is treated as smaller than every number), but which experts they select is
    unspecified.
    """
    T, E = logits.shape
    n_group, top_k = rule.n_group, rule.top_k
    gsize = E // n_group
    one = np.float32(1.0)
    ninf = np.float32(-np.inf)
    scores, choice, group_score, group_keep = buf.scores, buf.choice, buf.group_score, buf.group_keep
    sel_val, sel_idx, counts, offsets, cursor = buf.sel_val, buf.sel_idx, buf.counts, buf.offsets, buf.cursor
    topk_idx, topk_weight = buf.topk_idx, buf.topk_weight
    for e in range(E):
        counts[e] = 0
    for t in range(T):
        if rule.softmax:
            m = logits[t, 0]
            for e in range(1, E):
                if logits[t, e] > m:
                    m = logits[t, e]
            total = np.float32(0.0)
            for e in range(E):
                s = _exp32(logits[t, e] - m)
                scores[e] = s
                total += s
            for e in range(E):
                scores[e] = scores[e] / total
        else:
            for e in range(E):
                scores[e] = one / (one + _exp32(-logits[t, e]))
        for e in range(E):
            choice[e] = scores[e] + bias[e] if rule.biased else scores[e]
        for g in range(n_group):
            group_keep[g] = 0
        if n_group > 1:
            for g in range(n_group):
                m1 = ninf
                m2 = ninf
                for e in range(g * gsize, (g + 1) * gsize):
                    v = choice[e]
                    if v > m1:
                        m2 = m1
                        m1 = v
                    elif v > m2:
                        m2 = v
                group_score[g] = m1 if rule.group_max else m1 + m2
            # Keep topk_group groups: repeated arg-max, strict '>' keeps the lower index.
            for _ in range(rule.topk_group):
                best = -1
                bv = ninf
                for g in range(n_group):
                    if group_keep[g] == 0:
                        v = group_score[g]
                        if best < 0 or v > bv:
                            best = g
                            bv = v
                group_keep[best] = 1
        else:
            group_keep[0] = 1
        # Top-k of c over kept experts, visited in ascending index: an insertion list
        # sorted by value; strict '>' means an equal value never overtakes a lower index.
        n = 0
        for g in range(n_group):
            if group_keep[g] == 0:
                continue
            for e in range(g * gsize, (g + 1) * gsize):
                v = choice[e]
                if n < top_k:
                    p = n
                    n += 1
                elif v > sel_val[top_k - 1]:
                    p = top_k - 1
                else:
                    continue
                while p > 0 and v > sel_val[p - 1]:
                    sel_val[p] = sel_val[p - 1]
                    sel_idx[p] = sel_idx[p - 1]
                    p -= 1
                sel_val[p] = v
                sel_idx[p] = e
        # Ascending expert id within the token (insertion sort of k ids).
        for i in range(1, top_k):
            v_id = sel_idx[i]
            p = i
            while p > 0 and sel_idx[p - 1] > v_id:
                sel_idx[p] = sel_idx[p - 1]
                p -= 1
            sel_idx[p] = v_id
        total = np.float32(0.0)
        for i in range(top_k):
            e = sel_idx[i]
            topk_idx[t, i] = e
            w = scores[e]
            topk_weight[t, i] = w
            total += w
            counts[e] += 1
        if rule.norm_topk_prob:
            den = total + np.float32(1e-20)
            for i in range(top_k):
                topk_weight[t, i] = topk_weight[t, i] / den
        scaling = np.float32(rule.scaling)
        for i in range(top_k):
            topk_weight[t, i] = topk_weight[t, i] * scaling
    # Dispatch plan: offsets, active experts, then a stable counting sort by expert.
    offsets[0] = 0
    n_active = 0
    for e in range(E):
        offsets[e + 1] = offsets[e] + counts[e]
        cursor[e] = offsets[e]
        if counts[e] > 0:
            buf.active[n_active] = e
            n_active += 1
    for t in range(T):
        for i in range(top_k):
            e = topk_idx[t, i]
            p = cursor[e]
            cursor[e] = p + 1
            buf.token_ids[p] = t
            buf.token_weights[p] = topk_weight[t, i]
            buf.topk_pos[t, i] = p
    return n_active


class DispatchPlan(NamedTuple):
    """The first T tokens' routing and dispatch plan (views of :class:`RouteBuffers`, see there),
    with ``active`` cut to the ``n_active`` experts that have tokens."""

    topk_idx: np.ndarray
    topk_weight: np.ndarray
    topk_pos: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    token_weights: np.ndarray
    active: np.ndarray
    n_active: int


class Router:
    """The Numba routing of one MoE layer with preallocated buffers: batch-invariant logits,
    the rule and the dispatch plan for up to ``max_tokens`` tokens.

    Built from the gate ``weight`` [E, H] and ``bias`` [E] (numpy or torch; None or zeros
    when the rule has no bias). A call writes into the buffers and returns a
    :class:`DispatchPlan` of views, overwritten by the next call; nothing else is allocated.
    """

    def __init__(self, weight, bias, rule: RoutingRule, max_tokens: int):
        w = _as_numpy_f32(weight)
        if w.ndim != 2:
            raise ValueError(f"router weight must be [E, H], got shape {w.shape}")
        E, H = w.shape
        b = np.zeros(E, np.float32) if bias is None else _as_numpy_f32(bias)
        if b.shape != (E,):
            raise ValueError(f"e_score_correction_bias must be [{E}], got shape {b.shape}")
        if rule.n_experts != E:
            raise ValueError(f"the rule routes {rule.n_experts} experts, the gate weight has {E}")
        rule.check()
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.rule, self.hidden_size, self.max_tokens = rule, H, int(max_tokens)
        self.weight_t = np.ascontiguousarray(w.T)
        self.bias = b
        self.logits = np.zeros((self.max_tokens, E), np.float32)
        self.buf = RouteBuffers.allocate(rule, self.max_tokens)

    def __call__(self, x) -> DispatchPlan:
        """Route ``x`` float32 [T, H] (numpy, or a CPU tensor viewed without a copy)."""
        if hasattr(x, "detach"):                         # a torch tensor
            x = x.detach().numpy()
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"router input must be float32 [T, {self.hidden_size}], got {x.dtype} {x.shape}")
        T = self._check_rows(x.shape[0], "input has")
        logits = self.logits[:T]
        router_logits(np.ascontiguousarray(x), self.weight_t, logits)
        return self._plan(logits)

    def route_logits(self, logits) -> DispatchPlan:
        """Route precomputed logits float32 [T, E]."""
        if hasattr(logits, "detach"):                    # a torch tensor
            logits = logits.detach().to("cpu").numpy()
        E = self.rule.n_experts
        if logits.dtype != np.float32 or logits.ndim != 2 or logits.shape[1] != E:
            raise ValueError(f"router logits must be float32 [T, {E}], got {logits.dtype} {logits.shape}")
        self._check_rows(logits.shape[0], "logits have")
        return self._plan(np.ascontiguousarray(logits))

    def _check_rows(self, T: int, what: str) -> int:
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"router {what} T={T} rows; this Router holds 1..{self.max_tokens}")
        return T

    def _plan(self, logits: np.ndarray) -> DispatchPlan:
        T, k, b = logits.shape[0], self.rule.top_k, self.buf
        n_active = route_dispatch(logits, self.bias, self.rule, b)
        return DispatchPlan(b.topk_idx[:T], b.topk_weight[:T], b.topk_pos[:T], b.counts, b.offsets,
                            b.token_ids[:T * k], b.token_weights[:T * k], b.active[:n_active], n_active)


def _as_numpy_f32(a) -> np.ndarray:
    if hasattr(a, "detach"):                             # a torch tensor
        a = a.detach().float().cpu().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)
