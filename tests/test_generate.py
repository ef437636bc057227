"""``model.generate`` of int8 models on the stream engine and the decode loop behind it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdk
from runtime.cpu.engine import Engine
from runtime.cpu.generate import DEADLINE, FINISHED, MAX_NEW_TOKENS, TokenRule, decode, masked_argmax
from sdk.tools.loading import EngineGenerate

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def int8(tiny_checkpoint):
    path, _ = tiny_checkpoint
    return sdk.load_model(path, quant="int8")


def _by_hand(model, prompt, n_new, window):
    """Greedy decoding by stepping a fresh Engine one token at a time."""
    engine = Engine(model, capacity=1, window=window)
    slot = np.zeros(1, np.int64)
    for t in prompt:
        logits = engine.step_tokens(slot, np.array([t]))
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits[0])))
        logits = engine.step_tokens(slot, np.array([out[-1]]))
    return out


def test_int8_generate_is_the_engine_bitwise(int8):
    assert isinstance(int8.generate, EngineGenerate)
    ids = torch.tensor(RNG.integers(0, 97, (3, 7)))
    out = int8.generate(ids, max_new_tokens=20)
    assert out.shape == (3, 27) and out.dtype == torch.long and torch.equal(out[:, :7], ids)
    for row in range(3):
        assert out[row, 7:].tolist() == _by_hand(int8, ids[row].tolist(), 20, window=27)


def test_a_rows_tokens_are_the_same_alone_or_in_any_batch(int8):
    ids = torch.tensor(RNG.integers(0, 97, (6, 5)))
    batch = int8.generate(ids, max_new_tokens=16)
    for row in range(6):
        assert torch.equal(int8.generate(ids[row:row + 1], max_new_tokens=16), batch[row:row + 1])
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(int8.generate(ids[order], max_new_tokens=16), batch[order])
    assert torch.equal(int8.generate(ids[:2], max_new_tokens=16), batch[:2])


def test_the_engine_grows_for_longer_calls_and_results_do_not_depend_on_its_size(int8):
    gen = EngineGenerate(int8)
    ids = torch.tensor(RNG.integers(0, 97, (2, 10)))
    short = gen(ids, max_new_tokens=8)
    assert gen.engine.capacity == 2 and gen.engine.window == 64
    gen(torch.tensor(RNG.integers(0, 97, (5, 90))), max_new_tokens=60)
    assert gen.engine.capacity == 5 and gen.engine.window == 256
    assert torch.equal(gen(ids, max_new_tokens=8), short)


def test_int8_package_generate_runs_on_the_engine(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": RNG.integers(0, 97, 12).tolist()}) + "\n" for _ in range(8)))
    sdk.compress(path, tmp_path / "pkg", calib=calib, keep_ratio=0.5, progress=False)
    package = sdk.load_model(tmp_path / "pkg")
    assert isinstance(package.generate, EngineGenerate)
    ids = torch.tensor([[5, 9, 2, 7]])
    assert package.generate(ids, max_new_tokens=6)[0, 4:].tolist() == _by_hand(package, [5, 9, 2, 7], 6, 64)


def test_float_and_weight_only_models_keep_the_reference_generate(tiny_checkpoint):
    path, _ = tiny_checkpoint
    for quant in (None, "w8"):
        model = sdk.load_model(path, quant=quant)
        assert "generate" not in vars(model)


def test_decode_mixes_prompt_lengths_and_slots_without_changing_a_row(int8):
    model = int8
    prompts = [RNG.integers(0, 97, n).tolist() for n in (1, 9, 4, 13)]
    alone = [decode(Engine(model, capacity=1, window=32), [p], 12)[0].tokens for p in prompts]
    engine = Engine(model, capacity=6, window=64)
    rows = decode(engine, prompts, 12, slots=[5, 0, 3, 1])
    assert [r.tokens for r in rows] == alone
    assert all(r.status == MAX_NEW_TOKENS for r in rows)


def test_decode_stops_rows_by_their_rules_and_at_the_deadline(int8):
    model = int8
    engine = Engine(model, capacity=2, window=64)
    free = decode(engine, [[1, 2, 3]], 20)[0].tokens
    stop = free[5]
    rows = decode(engine, [[1, 2, 3], [1, 2, 3]], 20, rules=[TokenRule(stop=[stop]), TokenRule()])
    assert rows[0].status == FINISHED and rows[0].tokens == free[:free.index(stop) + 1]
    assert rows[1].status == MAX_NEW_TOKENS and rows[1].tokens == free

    ticks = iter(range(1000))       # a clock that advances one unit per reading
    late = decode(engine, [[1, 2, 3]], 20, deadline=6, clock=lambda: next(ticks))[0]
    assert late.status == DEADLINE and 0 < len(late.tokens) < 20 and late.tokens == free[:len(late.tokens)]
    assert decode(engine, [[1, 2, 3]], 20, deadline=0.0, clock=lambda: 1.0)[0].tokens == []


def test_decode_refuses_rows_that_do_not_fit(int8):
    model = int8
    engine = Engine(model, capacity=2, window=16)
    with pytest.raises(ValueError, match="prompt 1: 10 tokens.*window of 16"):
        decode(engine, [[1], list(range(10))], 7)
    with pytest.raises(ValueError, match="1..2 rows"):
        decode(engine, [[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        decode(engine, [[]], 4)


def test_masked_argmax_is_the_argmax_over_allowed_tokens():
    for vocab in (1, 31, 32, 33, 500):
        for _ in range(20):
            logits = RNG.standard_normal(vocab).astype(np.float32)
            logits[RNG.integers(0, vocab, 3)] = logits.max()          # ties go to the lowest id
            allowed = RNG.random(vocab) < RNG.choice([0.0, 0.02, 0.5, 1.0])
            words = np.zeros((vocab + 31) // 32 * 32, bool)
            words[:vocab] = allowed
            mask = np.packbits(words, bitorder="little").view(np.int32)
            expect = int(np.flatnonzero(allowed)[np.argmax(logits[allowed])]) if allowed.any() else -1
            assert masked_argmax(logits, mask) == expect

