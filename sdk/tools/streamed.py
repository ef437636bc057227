"""The calibration pass of compression: the model's own blocks run over weights streamed
from the source checkpoint, layer by layer.

:class:`Source` reads the float model lazily in row blocks from its memory-mapped files;
:class:`StreamedWeights` serves them to the blocks of ``runtime.model.transformer`` through
its weight seam (``Weights``: ``linear`` and ``vector``), so the pass computes the model's
own MLA (head group by head group), router, expert rules and decoder layer, never a copy.
The original model computes in float32; the compressed one quantizes (or rounds) each block
of rows as it reads it, writes it into the package file being written and computes with
exactly what it wrote, so the quality report measures the package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_BYTES = 1 << 25        # weights are read, quantized and written in row blocks of ~32 MB of float32
SCORE_BYTES = 1 << 26        # attention scores of one head group over one batch of rows


class Source:
    """The float model being compressed, read lazily in row blocks (memory-mapped).

    Either an HF checkpoint directory (routed experts stored one by one, any float or FP8
    dtype) or an unquantized r1edge package (experts stacked; may carry an I/O adapter and
    an earlier pruning, whose kept-expert map is composed with this one).
    """

    def __init__(self, path: Path):
        """Read the config (and a package's manifest) only; :meth:`open` reads the weights' headers."""
        from runtime.model.config import ModelConfig
        from sdk.tools.package import is_package, read_manifest

        self.path = path
        self.manifest = None
        self.io = None
        if is_package(path):
            self.manifest = read_manifest(path)
            scheme = self.manifest["quantization"]["scheme"]
            if scheme != "none":
                raise ValueError(f"{path}: package is already quantized ({scheme}); compress from the "
                                 "float checkpoint or a float package")
            self.cfg = ModelConfig.from_dict(self.manifest["config"], f"{path / 'manifest.json'}: 'config'")
            self.io = self.manifest.get("io")
        elif path.is_dir():
            self.cfg = ModelConfig.from_json(path / "config.json")
        else:
            raise FileNotFoundError(f"{path}: not a checkpoint or package directory")

    def open(self) -> None:
        """Verify a package's hashes, open the weight files and check every tensor's name and shape."""
        from runtime.model.weights import CheckpointReader
        from sdk.tools.package import verify_package

        if self.manifest is not None:
            verify_package(self.path)
        self.reader = CheckpointReader(self.path)
        self.stacked = any(n.endswith(".mlp.experts.gate_up_proj") for n in self.reader.names())
        self.files = sorted({self.reader.file_of(n) for n in self.reader.names()})
        self.size_bytes = sum(f.stat().st_size for f in self.files)
        self.check()

    def original_ids(self, layer: int) -> list[int]:
        """Original ids (as in the very first checkpoint) of this source's experts at ``layer``."""
        if self.manifest and self.manifest["experts"].get("kept", {}).get(str(layer)) is not None:
            return list(self.manifest["experts"]["kept"][str(layer)])
        return list(range(self.cfg.n_routed_experts))

    @property
    def original_n_routed(self) -> int:
        """Routed experts per layer of the very first checkpoint."""
        if self.manifest:
            return int(self.manifest["experts"].get("original_n_routed_experts", self.cfg.n_routed_experts))
        return self.cfg.n_routed_experts

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the source must hold, with its shape, in its own layout."""
        from runtime.model.transformer import IOAdapter, Transformer

        cfg = self.cfg
        with torch.device("meta"):
            model = Transformer(cfg)
            if self.io:
                model.adapter = IOAdapter(self.io["inputs"], self.io["outputs"], cfg.hidden_size)
        out = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        if cfg.tie_word_embeddings and "lm_head.weight" not in self.reader:
            out.pop("lm_head.weight")
        if not self.stacked:
            for name in [n for n in out if ".mlp.experts." in n]:
                prefix = name.split("mlp.experts.")[0] + "mlp.experts."
                if name.endswith("gate_up_proj"):
                    for e in range(cfg.n_routed_experts):
                        out[f"{prefix}{e}.gate_proj.weight"] = (cfg.moe_intermediate_size, cfg.hidden_size)
                        out[f"{prefix}{e}.up_proj.weight"] = (cfg.moe_intermediate_size, cfg.hidden_size)
                else:
                    for e in range(cfg.n_routed_experts):
                        out[f"{prefix}{e}.down_proj.weight"] = (cfg.hidden_size, cfg.moe_intermediate_size)
                del out[name]
        return out

    def check(self) -> None:
        """Every tensor present with its config shape, from the file headers only (no data read)."""
        for name, shape in self.expected().items():
            if name not in self.reader:
                raise ValueError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            if tuple(self.reader.shape(name)) != shape:
                raise ValueError(f"{self.reader.file_of(name)}: tensor {name!r} has shape "
                                 f"{tuple(self.reader.shape(name))}, expected {shape} from the config")

    def _name(self, name: str) -> str:
        if name == "lm_head.weight" and name not in self.reader:
            return "model.embed_tokens.weight"          # tied embeddings
        return name

    def get(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """One (small) tensor, dequantized if FP8, as ``dtype``."""
        return self.reader.get(self._name(name), dtype)

    def has(self, name: str) -> bool:
        """Whether the source holds ``name``."""
        return self._name(name) in self.reader

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a 2-D weight (an expert matrix by its per-expert HF name)."""
        if self.stacked and ".mlp.experts." in name:
            cfg = self.cfg
            down = name.endswith("down_proj.weight")
            return (cfg.hidden_size, cfg.moe_intermediate_size) if down else (cfg.moe_intermediate_size,
                                                                               cfg.hidden_size)
        return tuple(self.reader.shape(self._name(name)))

    def rows(self, name: str, first: int, stop: int, dtype=torch.float32) -> torch.Tensor:
        """Rows ``first..stop`` of a 2-D weight; expert matrices go by their HF names
        (``...mlp.experts.{e}.gate_proj.weight``) in either source layout."""
        if self.stacked and ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, kind = rest.split(".")[:2]
            e, inter = int(e), self.cfg.moe_intermediate_size
            if kind == "down_proj":
                return self.reader.rows(f"{prefix}.mlp.experts.down_proj", int(e), int(e) + 1, dtype)[0, first:stop]
            off = inter if kind == "up_proj" else 0
            return self.reader.rows(f"{prefix}.mlp.experts.gate_up_proj", e, e + 1, dtype)[0, off + first:off + stop]
        return self.reader.rows(self._name(name), first, stop, dtype)

    def nbytes(self, name: str) -> int:
        """Bytes of a weight in the source (an expert matrix by its HF name in either layout)."""
        if self.stacked and ".mlp.experts." in name:
            n, k = self.shape(name)
            return n * k * self.reader.element_size(name.split(".mlp.experts.")[0] + ".mlp.experts.down_proj")
        return self.reader.nbytes(self._name(name))


def block_rows(cols: int) -> int:
    """Rows of a [*, cols] float32 weight read at a time (a multiple of 128: whole FP8 blocks)."""
    return max(128, BLOCK_BYTES // (4 * max(cols, 1)) // 128 * 128)


def batches(lengths: list[int], max_tokens: int) -> list[tuple[list[int], int]]:
    """Rows grouped into batches of equal length of at most ``max_tokens`` tokens (one row at
    least): ``[(row indices, length)]`` in a fixed order."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    out = []
    for length, rows in sorted(by_len.items()):
        step = max(1, max_tokens // length)
        out += [(rows[i:i + step], length) for i in range(0, len(rows), step)]
    return out


class RowStream:
    """Calibration rows as one flat array of tokens: batch ``b`` holds ``spans[b] = (start, B, T)``
    (B rows of T tokens at ``start``); row-major, so a batch is ``x[start:start + B*T].view(B, T, -1)``."""

    def __init__(self, rows: list[torch.Tensor], max_tokens: int):
        self.spans: list[tuple[int, int, int]] = []
        order = []
        start = 0
        for idx, length in batches([int(r.shape[0]) for r in rows], max_tokens):
            self.spans.append((start, len(idx), length))
            order += idx
            start += len(idx) * length
        self.rows = [rows[i] for i in order]
        self.tokens = start

    def flat(self) -> torch.Tensor:
        """The rows' inputs (token ids or frames) concatenated in stream order."""
        return torch.cat(self.rows) if self.rows else torch.zeros(0)

    def __add__(self, other: "RowStream") -> "RowStream":
        both = RowStream([], 1)
        both.rows = self.rows + other.rows
        both.spans = self.spans + [(s + self.tokens, b, t) for s, b, t in other.spans]
        both.tokens = self.tokens + other.tokens
        return both


class StreamedWeights:
    """One model run over a stream, layer by layer, reading weights in row blocks.

    The original model (``out`` None) computes in float32 from the source weights. The
    compressed one quantizes each block as it reads it (int8, the rules of
    ``runtime.model.quant``) or rounds it to the store dtype (``quant="none"``), writes it into the
    package file being written (``out``), and computes with exactly what it wrote, so the
    quality report measures the package. Int8 linear layers give bitwise what the loaded
    package's ``Int8Linear`` gives: quantization is per output row and the int8 GEMM exact,
    so blocks of rows change nothing.
    """

    def __init__(self, src: Source, out=None, quant: str = "none", store: torch.dtype = torch.float32):
        self.src, self.out, self.quant, self.store = src, out, quant, store
        self._act = None

    @property
    def int8(self) -> bool:
        return self.out is not None and self.quant == "int8"

    def vector(self, name: str, key: str | None = None) -> torch.Tensor:
        """A norm weight (float32); the compressed model writes it as stored and uses that."""
        v = self.src.get(name)
        if self.out is None:
            return v
        stored = v.to(self.store)
        self.out.assign(key or name, slice(None), stored)
        return stored.float()

    def act(self, x: torch.Tensor):
        """Activations as a linear layer takes them: int8 rows with scales (the rule of
        ``runtime.model.quant.quantize_activation``, computed once for consecutive layers
        reading the same rows), or float."""
        from runtime.model.quant import quantize_activation

        if not self.int8:
            return x
        if self._act is None or self._act[0] is not x:
            self._act = (x, quantize_activation(x))
        return self._act[1]

    def scope(self, prefix: str, **keys) -> "Scope":
        """These weights under ``prefix`` as ``runtime.model.transformer.Weights``."""
        return Scope(self, prefix, keys)

    def linear(self, name: str, x: torch.Tensor, rows: tuple[int, int] | None = None, key: str | None = None,
               lead: tuple = (), col: int = 0) -> torch.Tensor:
        """``x @ W[rows].T`` for the source weight ``name`` (without ``.weight``), float32 [N, rows].

        ``x`` is float; the int8 model quantizes it (:meth:`act`). The compressed model writes
        the rows to package tensor ``key`` (default ``name``): an ``Int8Linear``
        (``.qweight_t`` columns and ``.scale``) or a float ``.weight``; for routed experts
        ``lead`` indexes the stacked tensor and ``col`` is where these rows start in it
        (``w13_t``/``gate_up_proj``).
        """
        from runtime.model.quant import int8_matmul, quantize_weight

        x = self.act(x)
        wname = name + ".weight"
        n_out, k_in = self.src.shape(wname)
        r0, r1 = rows or (0, n_out)
        n = (x[0] if self.int8 else x).shape[0]
        y = torch.empty(n, r1 - r0)
        step = block_rows(k_in)
        key = key or name
        expert = bool(lead)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            w = self.src.rows(wname, a, b)
            if self.out is None:
                y[:, a - r0:b - r0] = F.linear(x, w)
            elif self.int8:
                qt, sw = quantize_weight(w)
                cols = slice(col + a, col + b)
                if expert:
                    self.out.assign(key[0], lead + (slice(None), cols), qt)
                    self.out.assign(key[1], lead + (cols,), sw)
                else:
                    self.out.assign(key + ".qweight_t", (slice(0, k_in), cols), qt)
                    self.out.assign(key + ".scale", cols, sw)
                if n:
                    y[:, a - r0:b - r0] = int8_matmul(x[0], x[1], qt, sw)
            else:
                stored = w.to(self.store)
                self.out.assign(key if expert else key + ".weight", lead + (slice(col + a, col + b),), stored)
                y[:, a - r0:b - r0] = F.linear(x, stored.float())
            del w
        if self.src.has(name + ".bias"):
            if self.int8:
                raise ValueError(f"{name}: int8 linear layers have no bias; this checkpoint has one")
            bias = self.src.get(name + ".bias")[r0:r1]
            if self.out is not None:
                stored = bias.to(self.store)
                self.out.assign(key + ".bias", slice(r0, r1), stored)
                bias = stored.float()
            y += bias
        return y


class Scope:
    """:class:`StreamedWeights` under a name prefix, as the model's blocks take their weights
    (``runtime.model.transformer.Weights``). ``keys`` maps a local name to where the compressed
    model writes it: ``{"gate_proj": (key, lead, col), ...}`` for a routed expert's rows inside
    the stacked package tensors."""

    def __init__(self, weights: StreamedWeights, prefix: str, keys: dict):
        self.weights, self.prefix, self.keys = weights, prefix, keys

    def linear(self, name: str, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.keys:
            key, lead, col = self.keys[name]
            return self.weights.linear(self.prefix + name, x, rows, key=key, lead=lead, col=col)
        return self.weights.linear(self.prefix + name, x, rows)

    def vector(self, name: str) -> torch.Tensor:
        return self.weights.vector(self.prefix + name)


def rope_mask(cfg, T: int, window: int | None):
    """cos/sin for positions 0..T-1 and the additive causal mask (sliding ``window`` if given)."""
    from runtime.model.transformer import rope_cos_sin, rope_inv_freq

    inv_freq, factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, factor, torch.arange(T))
    mask = None
    if T > 1:
        mask = torch.full((T, T), float("-inf")).triu_(1)
        if window is not None:
            mask = mask + torch.full((T, T), float("-inf")).tril_(-window)
    return cos, sin, mask


@torch.no_grad()
def layer(p: StreamedWeights, i: int, x: torch.Tensor, stream: RowStream, cfg, window: int | None,
          feed_forward) -> torch.Tensor:
    """Decoder layer ``i`` on the stream's rows ``x`` (``runtime.model.transformer.decoder_layer``):
    :func:`attention`, then ``feed_forward(h)`` on the normed rows (:func:`mlp`, a MoE pass)."""
    from runtime.model.transformer import decoder_layer

    pre = f"model.layers.{i}."
    return decoder_layer(x, lambda h: attention(p, i, h, stream, cfg, window), lambda h, _: feed_forward(h),
                         p.vector(pre + "input_layernorm.weight"), p.vector(pre + "post_attention_layernorm.weight"),
                         cfg.rms_norm_eps)


@torch.no_grad()
def attention(p: StreamedWeights, i: int, h: torch.Tensor, stream: RowStream, cfg, window: int | None) -> torch.Tensor:
    """MLA of layer ``i`` on normed rows ``h``: the model's naive form (``mla_inputs``,
    ``mla_heads``, ``mla_attend`` of ``runtime.model.transformer``) run head group by head group
    and batch by batch, so only a group's queries, keys and values exist at a time, never the
    layer's full weights."""
    from runtime.model.transformer import apply_rope, mla_attend, mla_heads, mla_inputs

    w = p.scope(f"model.layers.{i}.self_attn.")
    nh, nope, rope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qk, N = nope + rope, h.shape[0]
    q_in, latent, k_raw = mla_inputs(w, cfg, h)
    tables = {T: rope_mask(cfg, T, window) for _, _, T in stream.spans}
    widest = max((B * T * T for _, B, T in stream.spans), default=1)
    group = max(1, min(nh, SCORE_BYTES // (4 * widest), SCORE_BYTES // (4 * max(N, 1) * (qk + nope + vd))))
    ctx = torch.empty(N, nh * vd)
    for h0 in range(0, nh, group):
        h1 = min(nh, h0 + group)
        g = h1 - h0
        q, kv = mla_heads(w, cfg, q_in, latent, (h0, h1))
        for start, B, T in stream.spans:
            cos, sin, mask = tables[T]
            sl = slice(start, start + B * T)
            k_pe = apply_rope(k_raw[sl].view(B, T, rope), cos, sin, cfg.rope_interleave)
            ctx[sl, h0 * vd:h1 * vd] = mla_attend(cfg, q[sl].view(B, T, g, qk), kv[sl].view(B, T, g, nope + vd),
                                                  k_pe, cos, sin, mask).reshape(B * T, g * vd)
        del q, kv
    return w.linear("o_proj", ctx)


def expert_weights(p: StreamedWeights, i: int, e: int, j: int | None = None) -> Scope:
    """Routed expert ``e`` (source id) of layer ``i``; the compressed model writes it as kept
    expert ``j`` into the stacked package tensors (``w13_t``/``s13``, ``w2_t``/``s2`` in int8,
    ``gate_up_proj``/``down_proj`` in float)."""
    prefix = f"model.layers.{i}.mlp.experts."
    if p.out is None:
        return p.scope(f"{prefix}{e}.")
    inter = p.src.cfg.moe_intermediate_size
    if p.int8:
        up, down = (prefix + "w13_t", prefix + "s13"), (prefix + "w2_t", prefix + "s2")
    else:
        up, down = prefix + "gate_up_proj", prefix + "down_proj"
    return p.scope(f"{prefix}{e}.", gate_proj=(up, (j,), 0), up_proj=(up, (j,), inter), down_proj=(down, (j,), 0))


@torch.no_grad()
def moe_reference(p: StreamedWeights, i: int, h: torch.Tensor, cfg, n_fit: int, stats, tick) -> tuple:
    """The original MoE of layer ``i`` on normed rows ``h``: the model's router
    (``gate_route``), then its float expert rule (``reference_experts``) with every expert that
    got tokens read and run one at a time (its float weights never all at once), plus the shared
    experts. ``stats`` receives the routing of the first ``n_fit`` (calibration) rows with the
    chosen experts' output norms (a ``RoutingRecord``); ``tick(e, skipped)`` follows progress.
    Returns (output, router weight, bias)."""
    from runtime.model.routing import RoutingRule
    from runtime.model.transformer import RoutingRecord, gate_route, reference_experts, swiglu

    pre = f"model.layers.{i}.mlp."
    rule = RoutingRule.from_config(cfg)
    gate = p.src.get(pre + "gate.weight")
    bias = p.src.get(pre + "gate.e_score_correction_bias") if rule.biased else None
    ids, weights = gate_route(h, gate, bias, rule)
    norms = torch.zeros_like(weights)

    def expert(e, rows):
        y = swiglu(expert_weights(p, i, e), rows)
        tick(e)
        return y

    out = reference_experts(expert, h, ids, weights, norms)
    for e in sorted(set(range(cfg.n_routed_experts)) - set(ids.unique().tolist())):
        tick(e, skipped=True)
    stats(RoutingRecord(i, ids[:n_fit], weights[:n_fit], norms[:n_fit]))
    if cfg.n_shared_experts:
        out = out + swiglu(p.scope(pre + "shared_experts."), h)
    return out, gate, bias


@torch.no_grad()
def moe_compressed(p: StreamedWeights, i: int, h: torch.Tensor, cfg, pcfg, kept: list[int], gate, bias,
                   tick) -> torch.Tensor:
    """The pruned MoE of layer ``i`` on normed rows ``h``: the router's kept rows, the kept
    experts quantized (or rounded) one at a time straight from the source and written as they
    are read, run by the package's own rule (``runtime.model.quant.dispatch_experts`` in int8,
    ``reference_experts`` in float), plus the shared experts."""
    from runtime.model.quant import dispatch_experts
    from runtime.model.routing import RoutingRule
    from runtime.model.transformer import gate_route, reference_experts, swiglu

    pre = f"model.layers.{i}.mlp."
    idx = torch.tensor(kept, dtype=torch.long)
    gate = gate.index_select(0, idx)
    p.out.assign(pre + "gate.weight", slice(None), gate)
    if bias is not None:
        bias = bias.index_select(0, idx)
        p.out.assign(pre + "gate.e_score_correction_bias", slice(None), bias)
    ids, weights = gate_route(h, gate, bias, RoutingRule.from_config(pcfg))

    def expert(j, rows):        # every kept expert runs (and is written), with tokens or not
        y = swiglu(expert_weights(p, i, kept[j], j), rows)
        tick(j)
        return y

    every = list(range(len(kept)))
    out = (dispatch_experts(expert, h, ids, weights, every) if p.int8
           else reference_experts(expert, h, ids, weights, experts=every))
    if cfg.n_shared_experts:
        out = out + swiglu(p.scope(pre + "shared_experts."), h)
    return out


@torch.no_grad()
def mlp(p: StreamedWeights, i: int, h: torch.Tensor) -> torch.Tensor:
    """The dense MLP of layer ``i`` on normed rows ``h`` (``runtime.model.transformer.swiglu``)."""
    from runtime.model.transformer import swiglu

    return swiglu(p.scope(f"model.layers.{i}.mlp."), h)


def write_head(p: StreamedWeights, cfg) -> None:
    """Write ``lm_head`` (compressed) without computing logits (sensor mode has no use for them)."""
    p.linear("lm_head", torch.zeros(0, cfg.hidden_size))


@torch.no_grad()
def head_lm(p: StreamedWeights, ref: torch.Tensor, cmp: torch.Tensor, targets: torch.Tensor, cfg) -> dict[str, Any]:
    """Write the final norm and ``lm_head`` and measure the quality report on the way: the
    head is read once, a block of vocabulary rows at a time, and both models' logits are
    reduced block by block (running argmax, dot products, log-sum-exp, target logits), so
    no [tokens, vocab] logits are ever held."""
    from runtime.model.transformer import rms_norm

    norm = p.src.get("model.norm.weight")
    ref = rms_norm(ref, norm, cfg.rms_norm_eps)
    cmp = rms_norm(cmp, p.vector("model.norm.weight"), cfg.rms_norm_eps)
    ref_p = StreamedWeights(p.src)
    n = ref.shape[0]
    V = cfg.vocab_size
    best = {k: torch.full((n,), -torch.inf, dtype=torch.float64) for k in ("r", "c")}
    arg = {k: torch.zeros(n, dtype=torch.long) for k in ("r", "c")}
    lse = {k: torch.zeros(n, dtype=torch.float64) for k in ("r", "c")}
    tgt = {k: torch.zeros(n, dtype=torch.float64) for k in ("r", "c")}
    dot, nr, nc = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    step = max(block_rows(cfg.hidden_size), 1024)
    valid = targets != -100
    for a in range(0, V, step):
        b = min(V, a + step)
        # Both models' logits from the same vocabulary rows: the head is read once per block.
        lr = ref_p.linear("lm_head", ref, rows=(a, b)).double()
        lc = p.linear("lm_head", cmp, rows=(a, b)).double()
        dot += (lr * lc).sum(-1)
        nr += lr.pow(2).sum(-1)
        nc += lc.pow(2).sum(-1)
        for k, lg in (("r", lr), ("c", lc)):
            m, am = lg.max(-1)
            new = m > best[k]
            arg[k] = torch.where(new, am + a, arg[k])
            top = torch.maximum(best[k], m)
            lse[k] = lse[k] * torch.exp(best[k] - top) + torch.exp(lg - top[:, None]).sum(-1)
            best[k] = top
            inside = valid & (targets >= a) & (targets < b)
            tgt[k][inside] = lg[inside, targets[inside] - a]
    cos = dot / (nr.sqrt() * nc.sqrt()).clamp(min=1e-8)
    nll = {k: (best[k] + lse[k].log() - tgt[k])[valid].sum() for k in ("r", "c")}
    n_next = int(valid.sum())
    return {"mode": "lm", "tokens": n,
            "greedy_agreement": float((arg["r"] == arg["c"]).double().mean()) if n else 0.0,
            "logits_cosine": float(cos.mean()) if n else 0.0,
            "nll_original": float(nll["r"]) / n_next if n_next else None,
            "nll_compressed": float(nll["c"]) / n_next if n_next else None}
