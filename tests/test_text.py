"""Text in and out: tokenizer files, R1's chat template, grammar-constrained decisions, the think
budget, deadlines, packages carrying the tokenizer, and ``r1edge generate``."""
from __future__ import annotations

import json
import random
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import sdk
from sdk.cli import main
from sdk.tools.package import PackageError, read_manifest
from sdk.tools.text import DecisionSchema, TextGenerator, load_tokenizer
from tests.conftest import save_reference

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

# The structure of DeepSeek-R1's chat template (tool calls left out): system prompts first, BOS,
# user turns after <｜User｜>, assistant turns after <｜Assistant｜> with their reasoning cut at
# </think>, and a generation prompt that opens <think>.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

WORDS = "level temperature valve pump heater setpoint is too high low open close fault bearing mode normal eco".split()

SCHEMA = {"type": "object", "properties": {
    "level_sp": {"type": "number", "minimum": 0.2, "maximum": 1.8, "multipleOf": 0.01},
    "temp_sp": {"type": "number", "minimum": 20, "maximum": 80, "multipleOf": 0.1},
    "valve": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
    "mode": {"enum": ["normal", "eco", "maintenance"]}}}


def _corpus(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) if rng.random() < 0.6 else
                       json.dumps({rng.choice(WORDS): round(rng.uniform(-100, 100), rng.randint(0, 3))})
                       for _ in range(rng.randint(4, 20)))


def save_text_checkpoint(path, vocab_size: int = 512, think: bool = True, seed: int = 0, **config) -> None:
    """A tiny random DeepSeek-V3 checkpoint (``config`` overrides its sizes) with a byte-level BPE
    trained here on generated plant text, R1's special tokens, its chat template's structure and
    a generation config."""
    save_reference(path, seed=seed, vocab_size=vocab_size, **config)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(2000), trainers.BpeTrainer(
        vocab_size=vocab_size - 12, special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if think:
        tok.add_tokens(["<think>", "</think>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True},
        "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True},
        "chat_template": R1_TEMPLATE}, ensure_ascii=False))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_ckpt")
    save_text_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def gen(text_ckpt):
    return TextGenerator.load(text_ckpt, window=512, capacity=8)


def _think_span(tokens, tok):
    """Tokens strictly between <think> (or the start) and </think>; None without </think>."""
    if tok.think_close_id not in tokens:
        return None
    body = tokens[:tokens.index(tok.think_close_id)]
    return body[body.index(tok.think_open_id) + 1:] if tok.think_open_id in body else body


def test_tokenizer_reads_the_checkpoint_files(text_ckpt):
    tok = sdk.load_tokenizer(text_ckpt)
    reference = HFTokenizer.from_file(str(text_ckpt / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_ids) == (0, [1])
    assert tok.think_open_id == reference.token_to_id("<think>") and tok.think_close_id is not None
    text = "level is too high: {\"valve\": 0.25}"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[1:] == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_chat_template_renders_r1s_structure(text_ckpt):
    tok = load_tokenizer(text_ckpt)
    messages = [{"role": "system", "content": "You run a tank."}, {"role": "user", "content": "level?"},
                {"role": "assistant", "content": "<think>\nlow, open it\n</think>\n\nopen the valve"},
                {"role": "user", "content": "and now?"}]
    text = tok.render_chat(messages)
    assert text == (f"{BOS}You run a tank.{USER}level?{ASSISTANT}\n\nopen the valve{EOS}{USER}and now?"
                    f"{ASSISTANT}<think>\n")
    assert tok.render_chat(messages[:2], add_generation_prompt=False) == f"{BOS}You run a tank.{USER}level?"
    ids = tok.encode_chat(messages)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    backend = HFTokenizer.from_file(str(text_ckpt / "tokenizer.json"))
    assert [ids.count(backend.token_to_id(t)) for t in (USER, ASSISTANT, EOS, "<think>")] == [2, 2, 1, 1]


def test_decision_schemas_are_checked(tmp_path):
    bad = [
        ({"type": "array"}, "type.*object"),
        ({"type": "object", "properties": {}}, "at least one field"),
        ({"type": "object", "properties": {"x": {"type": "number", "minimum": 0}}}, "properties.x.*maximum"),
        ({"type": "object", "properties": {"x": {"type": "number", "minimum": 2, "maximum": 1}}}, "minimum"),
        ({"type": "object", "properties": {"x": {"type": "string"}}}, "properties.x.*'string'"),
        ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9,
                                                 "exclusiveMaximum": 9}}}, "exclusiveMaximum"),
        ({"type": "object", "properties": {"x": {"enum": []}}}, "enum"),
        ({"type": "object", "properties": {"x": {"type": "boolean"}}, "additionalProperties": True},
         "additionalProperties"),
        ({"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["y"]}, "required"),
    ]
    for schema, match in bad:
        with pytest.raises(ValueError, match=match):
            DecisionSchema(schema)
    file = tmp_path / "s.json"
    file.write_text("{nope")
    with pytest.raises(ValueError, match=str(file)):
        DecisionSchema.from_file(file)
    s = DecisionSchema(SCHEMA)
    assert s.check({"level_sp": 1.0, "temp_sp": 20, "valve": 99.5, "mode": "eco"}) == []
    assert len(s.check({"level_sp": 1.9, "temp_sp": 20.05, "valve": True, "mode": "off", "x": 1})) == 5
    assert s.check({"level_sp": 1.0}) == ["temp_sp: missing", "valve: missing", "mode: missing"]


def test_200_prompts_every_finished_answer_parses_in_range_within_the_think_budget(gen):
    """A random model, 3 bounded numbers and an enum: every finished answer is valid JSON with
    every number in its range, and reasoning never passes 8 tokens."""
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(200)]
    results = []
    for i in range(0, len(prompts), 8):
        results += gen.generate_batch(prompts[i:i + 8], chat=True, max_new_tokens=64, max_think_tokens=8,
                                      schema=SCHEMA)
    finished = [r for r in results if r.status == "finished"]
    assert len(finished) >= 150, [r.status for r in results]
    for r in results:
        span = _think_span(r.tokens, gen.tokenizer)
        assert span is not None and len(span) == r.think_tokens <= 8
        assert (r.decision is not None) == (r.status == "finished")
    for r in finished:
        decision = json.loads(r.answer)          # parsed here, ranges checked here
        assert decision == r.decision and set(decision) == {"level_sp", "temp_sp", "valve", "mode"}
        for name in ("level_sp", "temp_sp", "valve"):
            prop = SCHEMA["properties"][name]
            assert isinstance(decision[name], (int, float)) and prop["minimum"] <= decision[name] <= prop["maximum"]
        assert decision["mode"] in ("normal", "eco", "maintenance")
        assert r.mask_us_per_token is not None


def test_a_think_budget_is_forced_closed_and_zero_means_no_reasoning(gen):
    for budget in (0, 1, 8):
        r = gen.generate("pump fault?", chat=True, max_new_tokens=80, max_think_tokens=budget, schema=SCHEMA)
        assert len(_think_span(r.tokens, gen.tokenizer)) == r.think_tokens <= budget
    # A plain prompt does not open <think>: the budget forces it open first.
    r = gen.generate("pump fault?", max_new_tokens=40, max_think_tokens=3)
    assert r.tokens[0] == gen.tokenizer.think_open_id and r.tokens[4] == gen.tokenizer.think_close_id
    assert r.think_tokens == 3 and r.think is not None


def test_a_deadline_of_1ms_is_a_counted_timeout_with_no_decision(gen):
    before = gen.stats()["timeouts"]
    long_prompt = " ".join(WORDS * 20)            # hundreds of prompt tokens, fed one step each
    r = gen.generate(long_prompt, chat=True, max_new_tokens=64, max_think_tokens=8, schema=SCHEMA,
                     deadline=time.monotonic() + 0.001)
    assert r.status == "deadline" and r.decision is None and not r.finished
    assert gen.stats()["timeouts"] == before + 1


def test_an_answer_cut_by_the_deadline_or_the_budget_is_not_used(text_ckpt):
    ticks = iter(range(100_000))
    slow = TextGenerator.load(text_ckpt, window=512, clock=lambda: next(ticks))
    full = slow.generate("valve?", chat=True, max_new_tokens=64, max_think_tokens=4, schema=SCHEMA)
    assert full.status == "finished"
    # The clock is read about once per engine step: a deadline inside the answer.
    cut = slow.generate("valve?", chat=True, max_new_tokens=64, max_think_tokens=4, schema=SCHEMA,
                        deadline=next(ticks) + full.prompt_tokens + len(full.tokens) // 2)
    assert cut.status == "deadline" and cut.decision is None
    assert 5 < len(cut.tokens) < len(full.tokens) and cut.tokens == full.tokens[:len(cut.tokens)]
    short = slow.generate("valve?", chat=True, max_new_tokens=len(full.tokens) - 1, max_think_tokens=4,
                          schema=SCHEMA)
    assert short.status == "max_new_tokens" and short.decision is None and short.answer.startswith("{")


def test_batch_rows_match_single_generations(gen):
    prompts = ["level high", "pump fault bearing", "open valve", "temperature low eco"]
    batch = gen.generate_batch(prompts, chat=True, max_new_tokens=48, max_think_tokens=5, schema=SCHEMA)
    for p, b in zip(prompts, batch):
        assert gen.generate(p, chat=True, max_new_tokens=48, max_think_tokens=5, schema=SCHEMA).tokens == b.tokens


def test_compress_copies_the_text_files_and_the_package_seals_them(text_ckpt, tmp_path):
    calib = tmp_path / "calib.jsonl"
    rng = random.Random(0)
    calib.write_text("".join(json.dumps({"input_ids": [rng.randrange(500) for _ in range(16)]}) + "\n"
                             for _ in range(8)))
    pkg = tmp_path / "pkg"
    sdk.compress(text_ckpt, pkg, calib=calib, keep_ratio=0.5, progress=False)
    files = read_manifest(pkg)["files"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert name in files and (pkg / name).read_bytes() == (text_ckpt / name).read_bytes()
    tok = load_tokenizer(pkg)
    assert tok.encode_chat([{"role": "user", "content": "level?"}]) == load_tokenizer(text_ckpt).encode_chat(
        [{"role": "user", "content": "level?"}])
    r = TextGenerator.load(pkg, window=256).generate("level?", chat=True, max_new_tokens=64, max_think_tokens=4,
                                                    schema=SCHEMA)
    assert r.status != "invalid"

    config = pkg / "tokenizer_config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"<think>", b"<thonk>"))
    with pytest.raises(PackageError, match="tokenizer_config.json: sha256 does not match"):
        load_tokenizer(pkg)
    with pytest.raises(PackageError, match="tokenizer_config.json"):
        sdk.load_model(pkg)
    config.write_bytes(original)
    (pkg / "chat_template.jinja").write_text("x")
    with pytest.raises(PackageError, match="not listed in manifest.json"):
        sdk.load_model(pkg)


def test_refusals_name_the_culprit(text_ckpt, tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="window of 512"):
        gen.generate("x " * 600, max_new_tokens=8)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_text_checkpoint(plain, think=False)
    with pytest.raises(ValueError, match="no <think>"):
        TextGenerator.load(plain, window=64).generate("x", max_think_tokens=4)
    small = tmp_path / "small"
    small.mkdir()
    save_text_checkpoint(small, vocab_size=256)
    for name in ("tokenizer.json",):
        (small / name).write_bytes((text_ckpt / name).read_bytes())
    with pytest.raises(ValueError, match="more than the model's vocab_size 256"):
        TextGenerator.load(small)


def test_cli_generate_streams_and_reports_json(text_ckpt, tmp_path, capsys):
    schema = tmp_path / "decision.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", str(text_ckpt), "--prompt", "level is high", "--chat", "--window", "512"]
    assert main(base + ["--max-think-tokens", "8", "--schema", str(schema), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("text", "tokens", "decision", "think_tokens", "tokens_per_s"):
        assert key in report
    assert report["think_tokens"] <= 8 and DecisionSchema(SCHEMA).check(report["decision"]) == []
    assert main(base + ["--max-think-tokens", "8", "--schema", str(schema)]) == 0
    out = capsys.readouterr().out
    shown = report["text"].replace("</think>", "</think>\n")        # the answer on a line of its own
    assert shown in out and "decision: " + json.dumps(report["decision"]) in out

    assert main(base + ["--max-think-tokens", "8", "--schema", str(schema), "--max-new-tokens", "12", "--json"]) == 1
    cut = json.loads(capsys.readouterr().out)
    assert cut["status"] == "max_new_tokens" and cut["decision"] is None
    assert main(base + ["--schema", str(schema), "--deadline-ms", "0.001", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "deadline"
    assert main(base + ["--schema", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
