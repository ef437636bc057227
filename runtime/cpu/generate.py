"""Greedy decoding on the CPU stream engine: token rows in, generated tokens out.

This is the engine-side half of text generation (``sdk.tools.text`` adds the tokenizer, the chat
template and grammar constraints on top; ``model.generate`` of an int8 model calls it
directly). Each row's prompt goes in through ``Engine.prefill`` (passes of many positions
through the same GEMMs), whose last logits give the row's first token; then every engine step
feeds each active row the token chosen from its previous logits, rows at their own positions.
Prefill leaves the very cache and logits that stepping the prompt token by token would.

A row's tokens depend only on its own prompt and rule: the engine is batch invariant, so a
row decodes to the same tokens alone or beside any other rows, in any slot.

Each row's next token comes from a rule (:class:`TokenRule` is plain greedy decoding; a
rule may mask the logits, force a token, or end the row). :func:`decode` owns no state beyond
the call: the caller owns the engine, and one engine serves one thread at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from numba import njit

FINISHED = "finished"           # the row's rule said its output is complete
MAX_NEW_TOKENS = "max_new_tokens"   # the token budget ran out first
DEADLINE = "deadline"           # the deadline passed before the row finished


class TokenRule:
    """Greedy choice: the highest logit, the lowest id among ties; a token in ``stop`` ends the row.

    Rules for constrained decoding implement the same two methods: ``choose`` may change
    ``logits`` in place (it is the engine's scratch row, overwritten by the next step), and
    ``accept`` is told the chosen token and returns True when the row is complete.
    """

    def __init__(self, stop: Sequence[int] = ()):
        self.stop = frozenset(int(t) for t in stop)

    def choose(self, logits: np.ndarray) -> int:
        """The next token from this row's logits [vocab]."""
        return int(np.argmax(logits))

    def accept(self, token: int) -> bool:
        """Record the chosen token; True when the row's output is complete."""
        return token in self.stop


@dataclass
class Decoded:
    """One row's result: the generated ``tokens`` (prompt excluded), why it ended
    (``status``: ``finished``, ``max_new_tokens`` or ``deadline``), and when its first
    token came and it ended (``time.monotonic()`` seconds)."""
    tokens: list[int] = field(default_factory=list)
    status: str = ""
    first_token_at: float | None = None
    ended_at: float | None = None


@njit(cache=True)
def masked_argmax(logits: np.ndarray, bitmask: np.ndarray) -> int:
    """The highest logit among the tokens whose bit is set in ``bitmask`` (int32 words, bit
    ``i % 32`` of word ``i // 32``, as grammar libraries write them), the lowest id among
    ties; -1 when no token is allowed. Words with no bit set are skipped whole."""
    best, best_id = np.float32(-np.inf), -1
    n = logits.shape[0]
    for w in range(bitmask.shape[0]):
        word = np.uint32(bitmask[w])
        if word == 0:
            continue
        base = w * 32
        for b in range(32):
            i = base + b
            if i >= n:
                break
            if (word >> np.uint32(b)) & np.uint32(1):
                if best_id < 0 or logits[i] > best:
                    best, best_id = logits[i], i
    return best_id


def decode(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           rules: Sequence[TokenRule] | None = None, slots: Sequence[int] | None = None,
           deadline: float | None = None, on_token: Callable[[int, int], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> list[Decoded]:
    """Decode ``prompts`` (token id rows, any lengths) on ``engine``, up to ``max_new_tokens``
    each; returns one :class:`Decoded` per row.

    ``slots`` (default 0..n-1) are reset first. ``rules`` (default: plain greedy, never
    ending early) choose each row's tokens. ``deadline`` is a ``clock()`` time: it is checked
    before each row's prefill and before every step, and a row that has not finished by then
    ends with status ``deadline``, including one whose last token came after it. ``on_token(row, token)`` is
    called as each token is chosen (streaming). A prompt plus its budget must fit the
    engine's window, so every token attends to the whole row.
    """
    n = len(prompts)
    if not 1 <= n <= engine.capacity:
        raise ValueError(f"decode takes 1..{engine.capacity} rows (the engine's capacity), got {n}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a row needs at least one token")
        if len(p) + max_new_tokens > engine.window:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the "
                             f"engine's window of {engine.window} tokens; use a larger window")
    slots = np.arange(n, dtype=np.int64) if slots is None else np.asarray(slots, dtype=np.int64)
    if slots.shape != (n,):
        raise ValueError(f"slots must list one slot per row ({n}), got {slots.tolist()}")
    rules = [TokenRule() for _ in range(n)] if rules is None else list(rules)
    if len(rules) != n:
        raise ValueError(f"rules must give one rule per row ({n}), got {len(rules)}")
    for s in slots:
        engine.reset_slot(int(s))
    results = [Decoded() for _ in range(n)]
    if max_new_tokens == 0:
        for r in results:
            r.status = MAX_NEW_TOKENS
        return results

    def take(r: int, row_logits: np.ndarray) -> int | None:
        """Row r's next token from its logits; None once the row has ended."""
        res = results[r]
        token = rules[r].choose(row_logits)
        res.tokens.append(token)
        if res.first_token_at is None:
            res.first_token_at = clock()
        if on_token is not None:
            on_token(r, token)
        if rules[r].accept(token):
            res.ended_at = clock()
            res.status = FINISHED if deadline is None or res.ended_at < deadline else DEADLINE
        elif len(res.tokens) >= max_new_tokens:
            res.status, res.ended_at = MAX_NEW_TOKENS, clock()
        else:
            return token
        return None

    def out_of_time(rows: Sequence[int]) -> bool:
        if deadline is None or clock() < deadline:
            return False
        now = clock()
        for r in rows:
            results[r].status, results[r].ended_at = DEADLINE, now
        return True

    active, feed = [], []
    for r in range(n):
        if out_of_time(range(r, n)):
            break
        token = take(r, engine.prefill(int(slots[r]), prompts[r]))
        if token is not None:
            active.append(r)
            feed.append(token)
    act_slots = slots[active]
    act_feed = np.array(feed, dtype=np.int64)
    while active and not out_of_time(active):
        logits = engine.step_tokens(act_slots, act_feed)
        keep = []
        for j, r in enumerate(active):
            token = take(r, logits[j])
            if token is not None:
                act_feed[j] = token
                keep.append(j)
        if len(keep) != len(active):
            active = [active[j] for j in keep]
            act_slots, act_feed = act_slots[keep], act_feed[keep]
    return results
