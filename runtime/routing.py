"""DeepSeek-V3 group-limited top-k routing fused with the MoE dispatch plan, in Numba.

The routing rule is DeepSeek's ``noaux_tc`` as in transformers' ``DeepseekV3TopkRouter``:

    logits = x @ W.T                          (float32)
    s      = sigmoid(logits)
    s'     = s + e_score_correction_bias
    group score = sum of the two largest s' in each of ``n_group`` equal groups
    keep the ``topk_group`` best groups; pick the ``top_k`` largest s' among their experts
    weights = s at those experts, divided by (sum + 1e-20) if ``norm_topk_prob``,
              times ``routed_scaling_factor``

Everything here is batch invariant: the logits, the expert choice and the weights of one
token are bitwise identical whatever the other tokens in the batch are and whatever their
number. ``router_logits`` sums every logit in one fixed order (see its docstring) instead of
going through a BLAS GEMM whose blocking changes with the batch size, so an expert choice
can never flip because a stream was batched with others.

The dispatch plan groups the (token, expert) assignments expert-major, so the expert
layer can run each active expert once over all of its tokens (see ``runtime.quant``).

``route_torch`` is the same routing in torch ops, kept for speed comparison and for
devices where Numba cannot run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from numba import njit


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def route_dispatch(
    logits,
    bias,
    n_group,
    topk_group,
    top_k,
    norm_topk_prob,
    scaling,
    scores,
    choice,
    group_score,
    group_keep,
    sel_val,
    sel_idx,
    cursor,
    topk_idx,
    topk_weight,
    topk_pos,
    counts,
    offsets,
    token_ids,
    token_weights,
    active,
):
    """Group-limited top-k routing and the expert-major dispatch plan, in one call.

    Inputs: ``logits`` float32 [T, E]; ``bias`` float32 [E] (e_score_correction_bias);
    ``n_group``, ``topk_group``, ``top_k`` ints (E divisible by n_group, at least two
    experts per group, topk_group * E / n_group >= top_k); ``norm_topk_prob`` bool;
    ``scaling`` float32 (routed_scaling_factor).

    Scratch (contents ignored, overwritten): ``scores``, ``choice`` float32 [E];
    ``group_score`` float32 [n_group]; ``group_keep`` uint8 [n_group]; ``sel_val``
    float32 [top_k]; ``sel_idx`` int32 [top_k]; ``cursor`` int32 [E].

    Outputs (written, nothing allocated):
    - ``topk_idx`` int32 [T, k]: chosen experts, ascending expert id within a token;
    - ``topk_weight`` float32 [T, k]: their weights, same order;
    - ``topk_pos`` int32 [T, k]: where each assignment sits in the dispatch order;
    - ``counts`` int32 [E]: tokens per expert; ``offsets`` int32 [E+1]: prefix sums;
    - ``token_ids`` int32 [T*k], ``token_weights`` float32 [T*k]: the assignments in
      expert-major order (a counting sort, stable by token: within an expert, tokens
      ascend), i.e. expert ``e`` serves ``token_ids[offsets[e]:offsets[e+1]]``;
    - ``active`` int32 [E]: the experts with at least one token, ascending.
    Returns the number of active experts.

    Arithmetic: s = 1 / (1 + exp(-logit)) in float32 with exp taken in float64 and
    rounded (torch's vectorised CPU sigmoid may differ by 1-2 ulp, so only choices
    separated by less than that can differ from torch); s' = s + bias in float32; the
    weight sum runs over the chosen experts in ascending id.

    Ties: among equal group scores the lower group index is kept; among equal s' the
    lower expert index is chosen. NaN scores never produce an out-of-range index (a NaN
    is treated as smaller than every number), but which experts they select is
    unspecified.
    """
    T, E = logits.shape
    gsize = E // n_group
    one = np.float32(1.0)
    ninf = np.float32(-np.inf)
    for e in range(E):
        counts[e] = 0
    for t in range(T):
        for e in range(E):
            ex = np.float32(math.exp(-np.float64(logits[t, e])))
            s = one / (one + ex)
            scores[e] = s
            choice[e] = s + bias[e]
        # Group score: the sum of the two largest s' (duplicates count twice).
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
            group_score[g] = m1 + m2
            group_keep[g] = 0
        # Keep topk_group groups: repeated arg-max, strict '>' keeps the lower index.
        for _ in range(topk_group):
            best = -1
            bv = ninf
            for g in range(n_group):
                if group_keep[g] == 0:
                    v = group_score[g]
                    if best < 0 or v > bv:
                        best = g
                        bv = v
            group_keep[best] = 1
        # Top-k of s' over kept experts, visited in ascending index: an insertion list
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
        if norm_topk_prob:
            den = total + np.float32(1e-20)
            for i in range(top_k):
                topk_weight[t, i] = topk_weight[t, i] / den
        for i in range(top_k):
            topk_weight[t, i] = topk_weight[t, i] * scaling
    # Dispatch plan: offsets, active experts, then a stable counting sort by expert.
    offsets[0] = 0
    n_active = 0
    for e in range(E):
        offsets[e + 1] = offsets[e] + counts[e]
        cursor[e] = offsets[e]
        if counts[e] > 0:
            active[n_active] = e
            n_active += 1
    for t in range(T):
        for i in range(top_k):
            e = topk_idx[t, i]
            p = cursor[e]
            cursor[e] = p + 1
            token_ids[p] = t
            token_weights[p] = topk_weight[t, i]
            topk_pos[t, i] = p
    return n_active


class DispatchPlan(NamedTuple):
    """Routing result and expert-major dispatch plan for T tokens (views, not copies).

    - ``topk_idx`` int32 [T, k], ascending expert id within a token;
    - ``topk_weight`` float32 [T, k], same order;
    - ``topk_pos`` int32 [T, k]: index of each assignment in ``token_ids``;
    - ``counts`` int32 [E]; ``offsets`` int32 [E+1];
    - ``token_ids`` int32 [T*k], ``token_weights`` float32 [T*k]: expert-major,
      tokens ascending within an expert;
    - ``active`` int32 [n_active]: experts with tokens, ascending; ``n_active`` int.

    From ``Router`` the fields are numpy arrays; from ``route_torch`` they are tensors.
    """

    topk_idx: np.ndarray
    topk_weight: np.ndarray
    topk_pos: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    token_weights: np.ndarray
    active: np.ndarray
    n_active: int


def check_routing_config(num_experts: int, n_group: int, topk_group: int, top_k: int) -> None:
    """Raise ValueError, naming the field, if the routing parameters are inconsistent."""
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide n_routed_experts={num_experts}")
    if num_experts // n_group < 2:
        raise ValueError(
            f"n_routed_experts/n_group={num_experts // n_group}: need at least 2 experts per group"
        )
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (num_experts // n_group):
        raise ValueError(
            f"num_experts_per_tok={top_k} must be in [1, topk_group * experts per group = "
            f"{topk_group * (num_experts // n_group)}]"
        )


def _as_numpy_f32(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


class Router:
    """DeepSeek-V3 router on the CPU: batch-invariant logits, routing and dispatch plan.

    Built from the gate ``weight`` [E, H] and ``bias`` [E] (e_score_correction_bias),
    numpy or torch, and the routing hyper-parameters. All buffers are allocated here for
    ``max_tokens``; a call writes into them and returns a ``DispatchPlan`` of views, so
    the steady state allocates nothing but the view objects. The views are overwritten
    by the next call.
    """

    def __init__(
        self,
        weight,
        bias,
        n_group: int,
        topk_group: int,
        top_k: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
        max_tokens: int,
    ):
        w = _as_numpy_f32(weight)
        b = _as_numpy_f32(bias)
        if w.ndim != 2:
            raise ValueError(f"router weight must be [E, H], got shape {w.shape}")
        E, H = w.shape
        if b.shape != (E,):
            raise ValueError(f"e_score_correction_bias must be [{E}], got shape {b.shape}")
        check_routing_config(E, n_group, topk_group, top_k)
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.num_experts, self.hidden_size = E, H
        self.n_group, self.topk_group, self.top_k = int(n_group), int(topk_group), int(top_k)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.scaling = np.float32(routed_scaling_factor)
        self.max_tokens = int(max_tokens)
        self.weight_t = np.ascontiguousarray(w.T)
        self.bias = b
        k, T = self.top_k, self.max_tokens
        self.logits = np.zeros((T, E), np.float32)
        self._scores = np.zeros(E, np.float32)
        self._choice = np.zeros(E, np.float32)
        self._group_score = np.zeros(n_group, np.float32)
        self._group_keep = np.zeros(n_group, np.uint8)
        self._sel_val = np.zeros(k, np.float32)
        self._sel_idx = np.zeros(k, np.int32)
        self._cursor = np.zeros(E, np.int32)
        self.topk_idx = np.zeros((T, k), np.int32)
        self.topk_weight = np.zeros((T, k), np.float32)
        self.topk_pos = np.zeros((T, k), np.int32)
        self.counts = np.zeros(E, np.int32)
        self.offsets = np.zeros(E + 1, np.int32)
        self.token_ids = np.zeros(T * k, np.int32)
        self.token_weights = np.zeros(T * k, np.float32)
        self.active = np.zeros(E, np.int32)

    def __call__(self, x) -> DispatchPlan:
        """Route ``x`` float32 [T, H] (numpy, or a CPU tensor viewed without a copy)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().numpy()
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"router input must be float32 [T, {self.hidden_size}], got {x.dtype} {x.shape}"
            )
        T = x.shape[0]
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"router input has T={T} tokens; this Router holds 1..{self.max_tokens}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        logits = self.logits[:T]
        router_logits(x, self.weight_t, logits)
        return self._plan(logits)

    def route_logits(self, logits) -> DispatchPlan:
        """Route precomputed logits float32 [T, E] (for example computed on a GPU)."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().to("cpu").numpy()
        if logits.dtype != np.float32 or logits.ndim != 2 or logits.shape[1] != self.num_experts:
            raise ValueError(
                f"router logits must be float32 [T, {self.num_experts}], got {logits.dtype} {logits.shape}"
            )
        T = logits.shape[0]
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"router logits have T={T} rows; this Router holds 1..{self.max_tokens}")
        return self._plan(np.ascontiguousarray(logits))

    def _plan(self, logits: np.ndarray) -> DispatchPlan:
        T, k = logits.shape[0], self.top_k
        n_active = route_dispatch(
            logits, self.bias, self.n_group, self.topk_group, k, self.norm_topk_prob,
            self.scaling, self._scores, self._choice, self._group_score, self._group_keep,
            self._sel_val, self._sel_idx, self._cursor,
            self.topk_idx, self.topk_weight, self.topk_pos, self.counts, self.offsets,
            self.token_ids, self.token_weights, self.active,
        )  # fmt: skip
        return DispatchPlan(
            self.topk_idx[:T],
            self.topk_weight[:T],
            self.topk_pos[:T],
            self.counts,
            self.offsets,
            self.token_ids[: T * k],
            self.token_weights[: T * k],
            self.active[:n_active],
            n_active,
        )


def route_torch(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    with_plan: bool = True,
) -> DispatchPlan:
    """The same routing in torch ops, following ``DeepseekV3TopkRouter`` step by step.

    ``logits`` float32 [T, E] on any device. Returns a ``DispatchPlan`` of tensors with
    ``topk_idx`` sorted ascending within a token, as ``Router`` does. Ties follow
    ``torch.topk``, whose order among equal values is not documented; ``Router`` is the
    implementation with a documented tie rule. With ``with_plan=False`` only
    ``topk_idx`` and ``topk_weight`` are filled (the rest are None).
    """
    T, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    topk_idx = topk_idx.sort(dim=-1)[0]
    topk_weight = scores.gather(1, topk_idx)
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weight = topk_weight * routed_scaling_factor
    if not with_plan:
        return DispatchPlan(topk_idx, topk_weight, None, None, None, None, None, None, 0)
    flat = topk_idx.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=logits.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    order = torch.sort(flat, stable=True)[1]
    token_ids = order // top_k
    token_weights = topk_weight.reshape(-1)[order]
    topk_pos = torch.empty_like(flat)
    topk_pos[order] = torch.arange(flat.numel(), device=logits.device)
    active = torch.nonzero(counts).flatten()
    return DispatchPlan(
        topk_idx, topk_weight, topk_pos.view(T, top_k), counts, offsets, token_ids,
        token_weights, active, int(active.numel()),
    )  # fmt: skip
