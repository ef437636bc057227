"""Language-model training: next-token cross-entropy on rows of token ids, several domains mixed.

:func:`fit_lm` trains a :class:`runtime.model.transformer.Transformer` whole (in place) on rows
of token ids grouped by domain: each step takes ``batch`` rows, the same number from every
domain (so a small domain is not drowned by a large one), and minimises the mean next-token
cross-entropy of the reference forward pass (the model the engine runs). AdamW, linear
warm-up then cosine decay to a tenth, gradient clipping; the routers are kept balanced the
DeepSeek-V3 way, with no auxiliary loss (:class:`sdk.tools.fit.BiasBalancer`). Every
``eval_every`` steps the held-out loss per domain is measured and, with ``checkpoint``, the
weights and the history are saved there (safetensors and JSON, no pickle); ``resume`` starts
again from those weights at that step (the optimizer's moments start afresh).

:func:`save_checkpoint` writes the model as an HF-layout checkpoint (``config.json``,
``model.safetensors``) beside a tokenizer, which ``sdk.compress`` turns into a package.
Everything is seeded: the same rows, arguments and thread count give the same weights.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from runtime.model.transformer import Transformer
from sdk.tools.fit import BiasBalancer, training_step

log = logging.getLogger(__name__)


def lm_loss(model: Transformer, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``model`` over rows [B, T+1] of token ids."""
    ids, target = rows[:, :-1], rows[:, 1:]
    logits = model.lm_head(model.hidden_states(model.model.embed_tokens(ids)))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


@torch.no_grad()
def held_out_loss(model: Transformer, rows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss over all of ``rows`` [N, T+1] (torch reference forward)."""
    was = model.training
    model.eval()
    total = 0.0
    for a in range(0, len(rows), batch):
        total += float(lm_loss(model, rows[a:a + batch])) * len(rows[a:a + batch])
    model.train(was)
    return total / max(1, len(rows))


def _check_rows(rows: Mapping[str, Any], vocab: int, where: str) -> dict[str, torch.Tensor]:
    out = {}
    if not rows:
        raise ValueError(f"{where}: no domains")
    for name, r in rows.items():
        t = torch.as_tensor(np.asarray(r), dtype=torch.long)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 2:
            raise ValueError(f"{where}[{name!r}]: expected token ids [N, T+1] with T >= 1, got {tuple(t.shape)}")
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise ValueError(f"{where}[{name!r}]: token ids must be in [0, {vocab}), got "
                             f"{int(t.min())}..{int(t.max())}")
        out[name] = t
    return out


def fit_lm(model: Transformer, train: Mapping[str, Any], held_out: Mapping[str, Any] | None = None, *,
           steps: int = 1000, batch: int = 16, lr: float = 3e-3, weight_decay: float = 0.01,
           seed: int = 0, balance_rate: float = 1e-3, grad_clip: float = 1.0, eval_every: int = 0,
           checkpoint: str | Path | None = None, resume: bool = False, progress: bool = True,
           stop_after: int | None = None, on_eval: Callable[[int, Transformer], None] | None = None
           ) -> dict[str, Any]:
    """Train ``model`` in place on ``train`` (``{domain: token ids [N, T+1]}``); returns a report
    with the loss curve, the held-out loss per domain at every evaluation, and the time taken.

    ``batch`` rows per step (a multiple of the number of domains: equal shares). ``stop_after``:
    end after that many steps of the ``steps``-long schedule (the learning rate not yet fully
    decayed), evaluating there. ``on_eval(step, model)`` is called at each evaluation.
    """
    vocab = model.config.vocab_size
    train = _check_rows(train, vocab, "train")
    held = _check_rows(held_out, vocab, "held_out") if held_out else {}
    names = sorted(train)
    if batch % len(names):
        raise ValueError(f"batch {batch} is not a multiple of the {len(names)} domains")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    end = steps if stop_after is None else stop_after
    if not 1 <= end <= steps:
        raise ValueError(f"stop_after must be in 1..steps={steps}, got {stop_after}")
    eval_every = eval_every or max(1, steps // 10)
    per = batch // len(names)
    rng = np.random.default_rng([seed, 0x1A])
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ckpt = Path(checkpoint) if checkpoint is not None else None
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    start = 0
    if resume and ckpt is not None and (ckpt / "state.json").is_file():
        from safetensors.torch import load_file

        meta = json.loads((ckpt / "state.json").read_text())
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        start, losses, history = meta["step"], meta["losses"], meta["history"]
        rng.bit_generator.state = meta["rng"]
        for _ in range(start):
            sched.step()
        log.info("resuming from %s at step %d (optimizer moments start afresh)", ckpt, start)
    balancer = BiasBalancer(model, balance_rate)
    model.train()
    t0 = time.perf_counter()
    seconds_before = history[-1]["seconds"] if history else 0.0
    try:
        for step in range(start, end):
            rows = torch.cat([train[n][torch.from_numpy(rng.integers(0, len(train[n]), per))] for n in names])
            losses.append(training_step(lm_loss(model, rows), opt, sched, balancer, params, grad_clip))
            done = step + 1
            if progress and done % 10 == 0:
                log.info("step %d/%d loss %.4f (%.2f s/step)", done, steps, float(np.mean(losses[-10:])),
                         (time.perf_counter() - t0) / (done - start))
            if done % eval_every == 0 or done == end:
                balancer.close()
                entry = {"step": done, "loss": float(np.mean(losses[-eval_every:])),
                         "held_out": {n: held_out_loss(model, r) for n, r in held.items()},
                         "seconds": round(seconds_before + time.perf_counter() - t0, 1)}
                history.append(entry)
                log.info("step %d: train loss %.4f, held-out %s", done, entry["loss"],
                         {n: round(v, 4) for n, v in entry["held_out"].items()})
                if on_eval is not None:
                    on_eval(done, model)
                model.train()
                balancer = BiasBalancer(model, balance_rate)
                if ckpt is not None:
                    _save(ckpt, model, {"step": done, "losses": losses, "history": history,
                                        "rng": rng.bit_generator.state})
    finally:
        balancer.close()
        for p in params:
            p.requires_grad_(False)
        model.eval()
    return {"steps": steps, "stopped_after": end if end < steps else None, "batch": batch, "lr": lr, "weight_decay": weight_decay, "seed": seed,
            "balance_rate": balance_rate, "threads": torch.get_num_threads(), "domains": names,
            "rows": {n: int(len(train[n])) for n in names}, "tokens_per_row": int(train[names[0]].shape[1] - 1),
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-max(1, eval_every):])),
            "history": history, "seconds": history[-1]["seconds"] if history else None}


def _save(ckpt: Path, model: Transformer, meta: dict) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.tmp"))
    os.replace(ckpt / "model.tmp", ckpt / "model.safetensors")
    (ckpt / "state.tmp").write_text(json.dumps(meta))
    os.replace(ckpt / "state.tmp", ckpt / "state.json")


def save_checkpoint(model: Transformer, out: str | Path) -> Path:
    """Write ``model`` as an HF-layout checkpoint directory (``config.json``, ``model.safetensors``,
    float32) that ``sdk.load_model`` and ``sdk.compress`` read; returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    return out
