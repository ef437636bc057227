"""How close a model's outputs are to a reference's, and what pruning costs.

- :func:`output_errors` / :func:`sensor_quality`: the per-output error measures that ``r1edge
  eval`` reports and that compression's quality report uses.
- :func:`evaluate_lm` scores a language model on rows of token ids by teacher forcing: at every
  position the next-token loss (nats) of the true token and the greedy choice. An int8 (W8A8)
  model on the CPU is run on the stream engine, token by token, exactly as ``model.generate``
  and the advisor run it (the engine that ``sdk.load_model`` attaches to ``generate``: its logits
  for a row's first t tokens are bitwise those ``generate`` chooses its next token from); a float
  model through its reference forward ``model(input_ids)``. ``benchmarks/bench_pruning.py`` builds
  its curve from it.

What the neighbouring keep ratios cost, as ``r1edge compress`` reports it, is ``sdk.tools.slope``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def output_errors(pred: np.ndarray, ref: np.ndarray, names: Sequence[str], lo: np.ndarray,
                  hi: np.ndarray) -> dict[str, dict[str, float]]:
    """Per output: RMS and largest absolute difference of ``pred`` from ``ref`` (any shape
    ending in [O]), in the output's units and as a fraction of its range ``hi - lo``."""
    err = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)).reshape(-1, len(names))
    span = np.maximum(np.asarray(hi, np.float64) - np.asarray(lo, np.float64), 1e-12)
    rms = np.sqrt(np.mean(err ** 2, axis=0))
    worst = np.max(np.abs(err), axis=0)
    return {name: {"rms": float(rms[j]), "rms_frac_range": float(rms[j] / span[j]),
                   "max_abs": float(worst[j]), "max_frac_range": float(worst[j] / span[j])}
            for j, name in enumerate(names)}


def sensor_quality(ref: list, cmp: list, norm_ref, norm_cmp, adapter) -> dict[str, Any]:
    """The compressed model's outputs against the uncompressed one's on the held-out rows, per
    output in the measures of ``r1edge eval`` (:func:`output_errors`; range: the span of
    the uncompressed outputs), and the output MSE (raw and normalised by each output's variance)."""
    import torch

    n_out = len(adapter.output_names)
    with torch.no_grad():
        r = torch.cat([adapter.decode(norm_ref(x)).reshape(-1, n_out) for x in ref]).double()
        c = torch.cat([adapter.decode(norm_cmp(x)).reshape(-1, n_out) for x in cmp]).double()
    err = c - r
    var = r.var(0, unbiased=False).clamp(min=1e-24)
    return {"mode": "sensor", "frames": int(r.shape[0]),
            "outputs": output_errors(c.numpy(), r.numpy(), adapter.output_names, r.amin(0).numpy(), r.amax(0).numpy()),
            "range": "span of the uncompressed model's outputs on the held-out rows",
            "output_mse": float(err.pow(2).mean()),
            "output_nmse": float((err.pow(2).mean(0) / var).mean()),
            "per_output_mse": {name: float(v) for name, v in zip(adapter.output_names, err.pow(2).mean(0))}}


def _engine_of(model):
    """The stream engine ``model.generate`` runs on (an int8 model on the CPU), else None."""
    from sdk.tools.loading import EngineGenerate

    return model.generate if isinstance(getattr(model, "generate", None), EngineGenerate) else None


def token_nll(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the negative log-likelihood of ``target`` under ``logits`` [n, V] (float64) and the argmax."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
    return lse - x[np.arange(len(x)), target], logits.argmax(-1)


def evaluate_lm(model, rows: Any, *, batch: int = 16) -> dict[str, Any]:
    """Teacher-forced next-token evaluation of ``model`` on ``rows`` [N, T+1] of token ids.

    Returns ``loss`` (mean nats per predicted token), ``nll`` (per token, float64 [N, T]),
    ``tokens`` (N x T), ``argmax`` (the greedy choice at every position, int64 [N, T]) and ``path`` (``"engine"`` for an int8
    model run on the stream engine, ``"reference"`` for the torch forward).
    """
    import torch

    ids = np.asarray(rows, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
        raise ValueError(f"rows must be token ids [N, T+1] with N >= 1 and T >= 1, got shape {ids.shape}")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"token ids must be in 0..{vocab - 1}, got {ids.min()}..{ids.max()}")
    N, T = ids.shape[0], ids.shape[1] - 1
    nll = np.zeros((N, T))
    argmax = np.zeros((N, T), dtype=np.int64)
    gen = _engine_of(model)
    for a in range(0, N, batch):
        chunk = ids[a:a + batch]
        b = len(chunk)
        if gen is not None:
            engine = gen.engine_for(b, T)
            slots = np.arange(b, dtype=np.int64)
            for s in slots:
                engine.reset_slot(int(s))
            for t in range(T):
                logits = engine.step_tokens(slots, chunk[:, t])
                nll[a:a + b, t], argmax[a:a + b, t] = token_nll(logits, chunk[:, t + 1])
        else:
            logits = model(torch.from_numpy(chunk[:, :-1])).numpy()
            for t in range(T):
                nll[a:a + b, t], argmax[a:a + b, t] = token_nll(logits[:, t], chunk[:, t + 1])
    return {"loss": float(nll.mean()), "nll": nll, "tokens": N * T, "argmax": argmax,
            "path": "engine" if gen is not None else "reference"}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions where two greedy choices [N, T] agree."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare greedy choices of shapes {a.shape} and {b.shape}")
    return float((a == b).mean())
