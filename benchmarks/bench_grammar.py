"""Grammar mask cost per token on the CPU, and structured decisions from a random model.

Part 1 (``masks``): the per-token mask of a decision schema (three bounded numbers and an
enum), computed by llguidance (r1edge's choice) and, when it is installed, by xgrammar, on two
byte-level BPE tokenizers trained here on generated text: the tests' 512 tokens, and one of R1's
vocabulary size (129,280 tokens; about 100 s to train, kept in ``--cache``). Each library walks
``--answers`` answers: random logits, masked, argmax, until the grammar closes. Prints p50 / p99
/ mean microseconds per mask, and how many answers break the schema (``multipleOf`` included)
as ``DecisionSchema.check`` sees them. The synthetic vocabulary is not R1's real one (no network here);
it has R1's size, byte-level pieces and special tokens.

Part 2 (``decisions``): ``TextGenerator`` on a random (untrained) tiny model with the tests'
tokenizer and R1's chat template structure: ``--prompts`` prompts, a think budget of 8 tokens,
the schema with and without ``multipleOf``; counts finished answers, checks each parses and is in
range, and reports the mask cost inside real generation. Usage:

    .venv/bin/python benchmarks/bench_grammar.py [--parts masks,decisions] [--cache DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_text import BOS, EOS, SCHEMA, WORDS, save_text_checkpoint  # noqa: E402

SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def _walk(compute, consume, done, reset, vocab: int, answers: int, seed: int = 0) -> tuple[list[float], list]:
    """Random-logit walks through the grammar; returns the mask times (s) and each answer's tokens."""
    rng = np.random.default_rng(seed)
    times, walks = [], []
    for _ in range(answers):
        reset()
        tokens = []
        while not done() and len(tokens) < 400:
            start = time.perf_counter()
            allowed = compute()
            times.append(time.perf_counter() - start)
            logits = rng.standard_normal(vocab).astype(np.float32)
            logits[~allowed] = -np.inf
            tokens.append(int(np.argmax(logits)))
            consume(tokens[-1])
        walks.append(tokens)
    return times, walks


def _bits(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def masks_llguidance(tokenizer_json: str, vocab: int, schema: dict, answers: int) -> dict:
    import llguidance

    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=1)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    mask = np.zeros((vocab + 31) // 32, np.int32)

    def compute():
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        return _bits(mask, vocab)

    return _summary(*_walk(compute, m.consume_token, m.is_stopped, m.reset, vocab, answers), "llguidance",
                    tokenizer_json)


def masks_xgrammar(tokenizer_file: Path, vocab: int, schema: dict, answers: int) -> dict | None:
    try:
        import xgrammar
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    m = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, vocab)

    def compute():
        m.fill_next_token_bitmask(mask)
        return _bits(mask[0].numpy(), vocab)

    return _summary(*_walk(compute, m.accept_token, m.is_terminated, m.reset, vocab, answers), "xgrammar",
                    tokenizer_file.read_text())


def _summary(times: list[float], walks: list, library: str, tokenizer_json: str) -> dict:
    """Mask time percentiles, and how many answers break the schema (checked by r1edge's
    ``DecisionSchema.check``, not by the library)."""
    from importlib.metadata import version

    from tokenizers import Tokenizer

    from sdk.tools.text import DecisionSchema

    tok, check = Tokenizer.from_str(tokenizer_json), DecisionSchema(SCHEMA)
    broken = 0
    for tokens in walks:
        try:
            broken += bool(check.check(json.loads(tok.decode(tokens, skip_special_tokens=True))))
        except json.JSONDecodeError:
            broken += 1
    us = np.asarray(times) * 1e6
    return {"version": version(library), "masks": len(us), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "mean_us": float(us.mean()),
            "longest_answer": max(len(w) for w in walks), "answers": len(walks), "answers_breaking_schema": broken}


def train_tokenizer(path: Path, vocab: int, rows: int) -> None:
    """A byte-level BPE of ``vocab`` tokens (R1's special tokens included) trained on generated
    text: plant words, numbers, JSON and random letter strings (which give enough distinct pairs
    for a large vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def corpus():
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        for _ in range(rows):
            parts = []
            for _ in range(rng.randint(5, 30)):
                r = rng.random()
                if r < 0.4:
                    parts.append(rng.choice(WORDS))
                elif r < 0.6:
                    parts.append(f"{rng.uniform(-100, 100):.{rng.randint(0, 4)}f}")
                elif r < 0.7:
                    parts.append(json.dumps({rng.choice(WORDS): rng.randint(0, 999)}))
                else:
                    parts.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 10))))
            yield " ".join(parts)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))


def part_masks(cache: Path, answers: int) -> dict:
    from sdk.tools.text import DecisionSchema

    out = {}
    for vocab, rows in ((512, 3000), (129280, 400000)):
        file = cache / f"bpe-{vocab}.json"
        if not file.is_file():
            print(f"training a {vocab}-token byte-level BPE ...", flush=True)
            train_tokenizer(file, vocab, rows)
        schema = DecisionSchema(SCHEMA).schema         # every property required, no others
        entry = {"llguidance": masks_llguidance(file.read_text(), vocab, schema, answers)}
        xg = masks_xgrammar(file, vocab, schema, answers)
        if xg is not None:
            entry["xgrammar"] = xg
        out[str(vocab)] = entry
        for lib, r in entry.items():
            print(f"vocab {vocab:>6}  {lib:<10} {r['version']:<8} mask p50 {r['p50_us']:7.1f} us  "
                  f"p99 {r['p99_us']:7.1f} us  mean {r['mean_us']:7.1f} us  ({r['masks']} masks, "
                  f"longest answer {r['longest_answer']} tokens); {r['answers_breaking_schema']} of "
                  f"{r['answers']} answers break the schema", flush=True)
    return out


def part_decisions(prompts: int) -> dict:
    from sdk.tools.text import DecisionSchema, TextGenerator

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(prompts)]
    unbounded = copy.deepcopy(SCHEMA)
    for prop in unbounded["properties"].values():
        prop.pop("multipleOf", None)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_text_checkpoint(Path(tmp))
        gen = TextGenerator.load(tmp, window=512, capacity=8)
        for name, schema in (("multipleOf", SCHEMA), ("no multipleOf", unbounded)):
            check = DecisionSchema(schema)
            gen.counts.clear()
            gen.mask_s, gen.masks = 0.0, 0
            start = time.perf_counter()
            results = []
            for i in range(0, prompts, 8):
                results += gen.generate_batch(texts[i:i + 8], chat=True, max_new_tokens=64, max_think_tokens=8,
                                              schema=schema)
            wall = time.perf_counter() - start
            finished = [r for r in results if r.status == "finished"]
            bad = [r.answer for r in finished if check.check(json.loads(r.answer))]
            st = gen.stats()
            out[name] = {"prompts": prompts, "finished": len(finished), "statuses": st["generations"],
                         "finished_invalid": len(bad), "max_think_tokens_seen": max(r.think_tokens for r in results),
                         "mask_us_per_token": st["mask_us_per_token"], "seconds": wall}
            print(f"decisions ({name}): {len(finished)}/{prompts} finished within 64 tokens, {len(bad)} of them "
                  f"invalid; statuses {st['generations']}; think tokens at most "
                  f"{out[name]['max_think_tokens_seen']} (budget 8); mask {st['mask_us_per_token']:.1f} us/token; "
                  f"{wall:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="masks,decisions")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "r1edge-bench-grammar"),
                    help="where the trained tokenizers are kept")
    ap.add_argument("--answers", type=int, default=50, help="random answers per library and vocabulary")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report = {}
    parts = args.parts.split(",")
    if "masks" in parts:
        report["masks"] = part_masks(cache, args.answers)
    if "decisions" in parts:
        report["decisions"] = part_decisions(args.prompts)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
