"""Text in and out: the checkpoint's tokenizer and chat template, and generation on the int8
stream engine with a think budget, a deadline and grammar-constrained JSON decisions.

- :func:`load_tokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library,
  ``tokenizer_config.json`` (special tokens, ``chat_template``) and ``generation_config.json``
  (end-of-sequence ids) from a checkpoint or package directory, as the official R1 release
  ships them. The chat template renders with Jinja2 the way transformers does (sandboxed,
  ``trim_blocks``, ``lstrip_blocks``, ``tojson``, ``raise_exception``); R1's template puts the
  reply after ``<｜Assistant｜>`` and its reasoning inside ``<think>...</think>``.
- :class:`DecisionSchema` is the JSON schema of a decision: an object of named numbers and
  integers (each with ``minimum`` and ``maximum``, optionally ``multipleOf``), enums and
  booleans. llguidance compiles it into a grammar that masks every token which could not
  continue a valid answer, so a finished answer always parses and every number is in range;
  the parsed answer is then checked again against the schema here, independently of the
  grammar library.
- :class:`TextGenerator` runs it: the prompt, then up to ``max_think_tokens`` of free reasoning
  inside ``<think>`` (``</think>`` is forced when the budget is spent), then the answer
  (constrained when a schema is given). A row that runs out of tokens or passes its deadline
  before the answer closes has no decision: nothing partial is used.

Why llguidance (1.9) rather than xgrammar (0.2): it has no dependencies (one abi3 wheel; xgrammar
requires torch, transformers and triton at install, and transformers is test-only here), reads
``tokenizer.json`` directly, honours ``multipleOf`` (which bounds a number's digits; xgrammar
0.2.9 ignored it: 45-48 of 50 random answers broke it), and releases the GIL while it computes a
mask. xgrammar's mask was about twice as fast; ``benchmarks/bench_grammar.py`` measures both.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.cpu.generate import DEADLINE, FINISHED, MAX_NEW_TOKENS, TokenRule, decode, masked_argmax

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
INVALID = "invalid"             # the answer closed but broke the grammar or the schema (never expected)


# ---------------------------------------------------------------------------------------
# Tokenizer and chat template

def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer (``tokenizer.json``), special tokens and chat template
    (``tokenizer_config.json``) and end-of-sequence ids (``generation_config.json``).

    ``encode`` prepends the BOS token when the config's ``add_bos_token`` is true (the default
    when a BOS token is named); ``encode_chat`` renders the chat template (which writes its own
    BOS) and encodes it without adding anything. ``eos_ids`` come from the generation config's
    ``eos_token_id`` (an id or a list), else from the tokenizer config's ``eos_token``.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer (a checkpoint or package for text needs tokenizer.json)")
        self.path = path
        self.json_text = file.read_text(encoding="utf-8")
        try:
            self.backend = HFTokenizer.from_str(self.json_text)
        except Exception as exc:          # the library raises its own exception type
            raise ValueError(f"{file}: not a tokenizers file ({exc})") from None
        self.config = self._read_json(path / "tokenizer_config.json")
        generation = self._read_json(path / "generation_config.json")
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.special = {key: _token_text(self.config.get(key))
                        for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._id(self.special["bos_token"], "bos_token")
        if self.bos_id is None and isinstance(generation.get("bos_token_id"), int):
            self.bos_id = generation["bos_token_id"]
        eos = generation.get("eos_token_id")
        if isinstance(eos, int):
            eos = [eos]
        if not (isinstance(eos, list) and eos and all(isinstance(e, int) for e in eos)):
            eos_id = self._id(self.special["eos_token"], "eos_token")
            eos = [eos_id] if eos_id is not None else []
        self.eos_ids = list(eos)
        self.add_bos = bool(self.config.get("add_bos_token", self.bos_id is not None)) and self.bos_id is not None
        self.think_open_id = self.backend.token_to_id(THINK_OPEN)
        self.think_close_id = self.backend.token_to_id(THINK_CLOSE)
        template = self.config.get("chat_template")
        if isinstance(template, list):      # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) else None
        self._compiled = None

    @staticmethod
    def _read_json(file: Path) -> dict:
        if not file.is_file():
            return {}
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        return data

    def _id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"{self.path / 'tokenizer_config.json'}: {key} {token!r} is not in tokenizer.json")
        return tid

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (special tokens written in it are recognised); BOS first when
        ``add_bos`` (default: the config's ``add_bos_token``)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, chat roles) dropped unless asked for."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` ([{"role", "content"}, ...]), rendered in a
        sandbox under a time and size budget (``sdk.tools.templates``); a template that fails or
        runs past it raises ``TemplateRenderError`` (a ValueError) naming the file."""
        if self.chat_template is None:
            raise ValueError(f"{self.path / 'tokenizer_config.json'}: no chat_template")
        where = f"{self.path / 'tokenizer_config.json'}: chat_template"
        if self._compiled is None:
            import jinja2

            from sdk.tools.templates import compile_template, environment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = environment(filters={"tojson": tojson}, globals={"raise_exception": raise_exception},
                              trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            self._compiled = compile_template(env, self.chat_template, where)
        from sdk.tools.templates import render

        specials = {k: v for k, v in self.special.items() if v is not None}
        return render(self._compiled, {"messages": list(messages), "add_generation_prompt": add_generation_prompt,
                                       **specials}, where)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template writes BOS itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt), add_bos=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint or package directory. In a package, the tokenizer files
    are checked against the manifest's sha256 first (packages are sealed)."""
    from sdk.tools.package import TEXT_FILES, is_package, read_manifest, verify_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or package directory")
    if is_package(path):
        files = read_manifest(path)["files"]
        for name in TEXT_FILES:
            if name in files:
                verify_file(path, name, files[name])
            elif (path / name).exists():
                raise ValueError(f"{path / name}: not listed in manifest.json (packages are sealed)")
    return Tokenizer(path)


# ---------------------------------------------------------------------------------------
# Decision schema

_PROPERTY_KEYS = {"type", "minimum", "maximum", "multipleOf", "enum", "description", "title"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class DecisionSchema:
    """The JSON schema of a structured decision, checked on construction.

    An object whose properties are each a number or integer with ``minimum`` and ``maximum``
    (and optionally ``multipleOf``, which also bounds how many digits the model may write), an
    ``enum`` of strings, numbers or booleans, or a boolean. ``required`` defaults to every
    property and ``additionalProperties`` is always false: a decision names exactly its
    fields. Anything else (an unbounded number, a free string, an unknown keyword) is refused
    with an error naming it, so no constraint is silently ignored.
    """

    def __init__(self, schema: Any, where: str = "schema"):
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ValueError(f"{where}: a decision schema is a JSON object with \"type\": \"object\"")
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            raise ValueError(f"{where}: 'properties' must name at least one field")
        for name, prop in props.items():
            self._check_property(prop, f"{where}: properties.{name}")
        required = schema.get("required", list(props))
        if not isinstance(required, list) or not set(required) <= set(props):
            raise ValueError(f"{where}: 'required' must list property names")
        if schema.get("additionalProperties", False) is not False:
            raise ValueError(f"{where}: 'additionalProperties' must be false (a decision names exactly its fields)")
        self.where = where
        self.schema = {**schema, "required": required, "additionalProperties": False}
        self.properties, self.required = props, required

    @staticmethod
    def _check_property(prop: Any, where: str) -> None:
        if not isinstance(prop, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = sorted(set(prop) - _PROPERTY_KEYS)
        if unknown:
            raise ValueError(f"{where}: keyword {unknown[0]!r} is not supported in decisions")
        kind = prop.get("type")
        if "enum" in prop:
            enum = prop["enum"]
            if (not isinstance(enum, list) or not enum
                    or not all(isinstance(v, (str, bool)) or _is_number(v) for v in enum)):
                raise ValueError(f"{where}: 'enum' must be a non-empty list of strings, numbers or booleans")
        elif kind in ("number", "integer"):
            lo, hi = prop.get("minimum"), prop.get("maximum")
            if not (_is_number(lo) and _is_number(hi)) or lo > hi:
                raise ValueError(f"{where}: a {kind} needs numeric 'minimum' <= 'maximum' (got {lo!r}, {hi!r})")
            step = prop.get("multipleOf")
            if step is not None and not (_is_number(step) and step > 0):
                raise ValueError(f"{where}: 'multipleOf' must be a positive number, got {step!r}")
        elif kind != "boolean":
            raise ValueError(f"{where}: must be a number or integer with minimum/maximum, an enum or a boolean "
                             f"(got type {kind!r})")

    @classmethod
    def from_file(cls, path: str | Path) -> "DecisionSchema":
        """Read a schema from a JSON file; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such schema file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls(data, str(path))

    def key(self) -> str:
        """A canonical string of the schema (cache key)."""
        return json.dumps(self.schema, sort_keys=True)

    def grammar(self) -> str:
        """The llguidance grammar of the schema: compact JSON (no free whitespace), properties
        in the schema's order."""
        import llguidance

        return llguidance.LLMatcher.grammar_from_json_schema(self.schema, defaults={"whitespace_flexible": False})

    def check(self, decision: Any) -> list[str]:
        """What is wrong with a parsed decision (empty when it fits the schema); checked here,
        not by the grammar library."""
        if not isinstance(decision, dict):
            return [f"the decision is {type(decision).__name__}, not an object"]
        errors = [f"{k}: not in the schema" for k in decision if k not in self.properties]
        errors += [f"{k}: missing" for k in self.required if k not in decision]
        for name, prop in self.properties.items():
            if name not in decision:
                continue
            v = decision[name]
            if "enum" in prop:
                if not any(v == e and type(v) is type(e) or (_is_number(v) and _is_number(e) and v == e)
                           for e in prop["enum"]):
                    errors.append(f"{name}: {v!r} is not one of {prop['enum']}")
            elif prop.get("type") == "boolean":
                if not isinstance(v, bool):
                    errors.append(f"{name}: {v!r} is not a boolean")
            elif not _is_number(v) or (prop["type"] == "integer" and not isinstance(v, int)):
                errors.append(f"{name}: {v!r} is not a{'n integer' if prop['type'] == 'integer' else ' number'}")
            elif not prop["minimum"] <= v <= prop["maximum"]:
                errors.append(f"{name}: {v!r} is outside [{prop['minimum']}, {prop['maximum']}]")
            elif "multipleOf" in prop:
                q = v / prop["multipleOf"]
                if abs(q - round(q)) > 1e-6 * max(1.0, abs(q)):
                    errors.append(f"{name}: {v!r} is not a multiple of {prop['multipleOf']}")
        return errors


# ---------------------------------------------------------------------------------------
# Generation

@dataclass
class Generation:
    """One generation: the text and tokens produced (prompt excluded), the reasoning and the
    answer, the parsed ``decision`` (with a schema; None unless the answer finished and passed
    the schema), ``status`` (``finished``, ``max_new_tokens``, ``deadline`` or ``invalid``) and
    its timings. ``tokens_per_s`` counts the generated tokens over the time from the first
    generated token to the last (prefill excluded)."""
    text: str
    tokens: list[int]
    decision: dict | None
    think_tokens: int
    tokens_per_s: float
    status: str
    prompt_tokens: int
    think: str | None
    answer: str
    seconds: float
    prefill_s: float
    mask_us_per_token: float | None
    errors: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the answer closed (and, with a schema, parsed and passed it)."""
        return self.status == FINISHED

    def to_dict(self) -> dict:
        """A JSON-ready dict (``r1edge generate --json``)."""
        return {**asdict(self), "finished": self.finished}


class _TextRule(TokenRule):
    """One row's token choice: optionally force ``<think>``, reason freely (EOS masked, ids the
    tokenizer does not know masked) up to ``max_think`` tokens, force ``</think>``, then answer
    under the grammar (``matcher``) or freely until EOS."""

    def __init__(self, tok: Tokenizer, *, phase: str, max_think: int | None, matcher, vocab: int):
        self.tok, self.phase, self.max_think, self.matcher = tok, phase, max_think, matcher
        self.eos = np.array(tok.eos_ids, dtype=np.int64)
        self.known = tok.vocab_size
        self.think_tokens = 0
        self.answer_from = 0            # index of the answer's first token among the generated ones
        self.generated = 0
        self.error = None
        self.mask = np.zeros((vocab + 31) // 32, dtype=np.int32) if matcher is not None else None
        self.mask_s, self.masks = 0.0, 0

    def choose(self, logits: np.ndarray) -> int:
        if self.phase == "open":
            return self.tok.think_open_id
        if self.phase == "think":
            if self.max_think is not None and self.think_tokens >= self.max_think:
                return self.tok.think_close_id
            logits[self.eos] = -np.inf
            return int(np.argmax(logits[:self.known]))
        if self.matcher is None:
            return int(np.argmax(logits[:self.known]))
        start = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        token = masked_argmax(logits, self.mask)
        self.mask_s += time.perf_counter() - start
        self.masks += 1
        return token if token >= 0 else int(self.eos[0])

    def accept(self, token: int) -> bool:
        self.generated += 1
        if self.phase == "open":
            self.phase = "think"
            return False
        if self.phase == "think":
            if token == self.tok.think_close_id:
                self.phase, self.answer_from = "answer", self.generated
            else:
                self.think_tokens += 1
            return False
        if self.matcher is None:
            return token in self.tok.eos_ids
        if token in self.tok.eos_ids and self.matcher.is_accepting():
            return True
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} refused by the grammar"
            return True
        return self.matcher.is_stopped()


class TextGenerator:
    """Text generation and structured decisions on the int8 stream engine.

    ``generate(prompt, ...)`` -> :class:`Generation`; ``generate_batch`` decodes up to
    ``capacity`` prompts in one engine batch (each row's tokens are the same as alone).
    ``window`` bounds prompt plus generated tokens per row (the engine's ring buffer; a
    request that would not fit is refused rather than sliding). ``stats()`` counts the
    generations by status (timeouts are ``deadline``). ``clock`` is the time base of deadlines
    and timings (``time.monotonic`` by default).

    For a caller on a background thread (an advisor beside a control loop): the generator owns
    its engine, separate from any other, and must be used from one thread at a time; pass
    ``deadline`` as a ``clock()`` time. It is checked before every engine step, so a
    call returns at most one step (plus one grammar mask) after it, with status ``deadline``
    and no decision. Engine steps hold the GIL for their duration; llguidance releases it
    while computing a mask.
    """

    def __init__(self, model, tokenizer: Tokenizer, *, window: int = 2048, capacity: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        from runtime.cpu.engine import Engine

        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size {vocab}")
        self.model, self.tokenizer, self.vocab, self.clock = model, tokenizer, vocab, clock
        self.engine = Engine(model, capacity=capacity, window=window)
        self.counts: Counter = Counter()
        self.mask_s, self.masks = 0.0, 0
        self._ll_tokenizer = None
        self._grammars: dict[str, str] = {}
        masked_argmax(np.zeros(32, np.float32), np.zeros(1, np.int32))     # compile (or load) it now

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "TextGenerator":
        """Model and tokenizer from one checkpoint or package directory (``kwargs`` as for the
        constructor)."""
        from sdk.tools.loading import load_model

        return cls(load_model(path), load_tokenizer(path), **kwargs)

    def _matcher(self, schema: DecisionSchema):
        import llguidance

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.json_text, n_vocab=self.vocab,
                                                        eos_token=self.tokenizer.eos_ids or None)
        key = schema.key()
        if key not in self._grammars:
            self._grammars[key] = schema.grammar()
        matcher = llguidance.LLMatcher(self._ll_tokenizer, self._grammars[key], log_level=0)
        if matcher.is_error():
            raise ValueError(f"{schema.where}: the grammar library refused the schema: {matcher.get_error()}")
        return matcher

    def prompt_ids(self, prompt: str | Sequence[dict], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: plain text, or through the chat template when ``chat`` is true
        (a string becomes one user message) or ``prompt`` is a list of messages."""
        if not isinstance(prompt, str):
            return self.tokenizer.encode_chat(prompt)
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _rule(self, ids: list[int], max_think_tokens: int | None, schema: DecisionSchema | None) -> _TextRule:
        tok = self.tokenizer
        has_think = tok.think_open_id is not None and tok.think_close_id is not None
        if max_think_tokens is not None:
            if max_think_tokens < 0:
                raise ValueError(f"max_think_tokens must be >= 0, got {max_think_tokens}")
            if not has_think:
                raise ValueError(f"{tok.path}: the tokenizer has no {THINK_OPEN}/{THINK_CLOSE} tokens for a think budget")
        if (schema is not None or max_think_tokens is not None) and not tok.eos_ids:
            raise ValueError(f"{tok.path}: no end-of-sequence token (generation_config.json or tokenizer_config.json)")
        think_open = has_think and tok.think_open_id in ids and (
            tok.think_close_id not in ids
            or len(ids) - 1 - ids[::-1].index(tok.think_open_id) > len(ids) - 1 - ids[::-1].index(tok.think_close_id))
        phase = "think" if think_open else ("open" if max_think_tokens else "answer")
        if max_think_tokens == 0 and not think_open:
            phase = "answer"
        matcher = self._matcher(schema) if schema is not None else None
        return _TextRule(tok, phase=phase, max_think=max_think_tokens, matcher=matcher, vocab=self.vocab)

    def generate(self, prompt: str | Sequence[dict], *, chat: bool = False, max_new_tokens: int = 256,
                 max_think_tokens: int | None = None, schema: DecisionSchema | dict | None = None,
                 deadline: float | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Generate from one prompt (see :meth:`generate_batch`); ``on_text`` receives the text
        as it is generated (streaming), and a line break where the reasoning ends (``</think>``)."""
        return self.generate_batch([prompt], chat=chat, max_new_tokens=max_new_tokens,
                                   max_think_tokens=max_think_tokens, schema=schema, deadline=deadline,
                                   on_text=on_text)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[dict]], *, chat: bool = False,
                       max_new_tokens: int = 256, max_think_tokens: int | None = None,
                       schema: DecisionSchema | dict | None = None, deadline: float | None = None,
                       on_text: Callable[[str], None] | None = None) -> list[Generation]:
        """Generate from up to ``capacity`` prompts in one engine batch.

        ``max_new_tokens`` counts every generated token (reasoning, forced ``<think>`` and
        ``</think>``, answer). With ``max_think_tokens`` the reply reasons first: ``<think>`` is
        forced unless the prompt already opened it (R1's template does), at most that many
        tokens follow, then ``</think>``. With ``schema`` the answer is a JSON decision
        constrained by its grammar. ``deadline`` is a ``clock()`` time. ``on_text``
        streams the first row's text (a line break added where its reasoning ends).
        """
        if schema is not None and not isinstance(schema, DecisionSchema):
            schema = DecisionSchema(schema)
        ids = [self.prompt_ids(p, chat=chat) for p in prompts]
        rules = [self._rule(row, max_think_tokens, schema) for row in ids]
        on_token = None
        if on_text is not None:
            streamed: list[int] = []
            shown = [""]

            def on_token(row: int, token: int) -> None:
                if row != 0:
                    return
                streamed.append(token)
                text = self.tokenizer.decode(streamed)
                if not text.endswith("\ufffd") and len(text) > len(shown[0]):   # wait for whole characters
                    on_text(text[len(shown[0]):])
                    shown[0] = text
                if token == self.tokenizer.think_close_id:
                    on_text("\n")          # the answer starts on a line of its own

        start = self.clock()
        rows = decode(self.engine, ids, max_new_tokens, rules=rules, deadline=deadline, on_token=on_token,
                      clock=self.clock)
        return [self._result(row, rule, len(p), schema, start) for row, rule, p in zip(rows, rules, ids)]

    def _result(self, row, rule: _TextRule, n_prompt: int, schema: DecisionSchema | None,
                start: float) -> Generation:
        tok, tokens = self.tokenizer, row.tokens
        status, errors, decision = row.status, [], None
        answer_ids = tokens[rule.answer_from:] if rule.phase == "answer" else []
        think = None
        if rule.think_tokens or rule.answer_from or rule.phase == "think":
            end = rule.answer_from - 1 if rule.phase == "answer" else len(tokens)
            think = tok.decode([t for t in tokens[:max(end, 0)] if t != tok.think_open_id])
        answer = tok.decode(answer_ids)
        if status == FINISHED and rule.error is not None:
            status, errors = INVALID, [rule.error]
        elif status == FINISHED and schema is not None:
            try:
                parsed = json.loads(answer)
            except json.JSONDecodeError as exc:
                parsed, errors = None, [f"the answer does not parse: {exc}"]
            errors = errors or schema.check(parsed)
            if errors:
                status = INVALID
            else:
                decision = parsed
        if errors:
            log.warning("generation ended %s: %s", status, "; ".join(errors))
        self.counts[status] += 1
        self.mask_s += rule.mask_s
        self.masks += rule.masks
        first = row.first_token_at
        decode_s = row.ended_at - first if first is not None and row.ended_at is not None else 0.0
        return Generation(
            text=tok.decode(tokens), tokens=list(tokens), decision=decision, think_tokens=rule.think_tokens,
            tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            status=status, prompt_tokens=n_prompt, think=think, answer=answer,
            seconds=(row.ended_at or self.clock()) - start,
            prefill_s=(first - start) if first is not None else 0.0,
            mask_us_per_token=rule.mask_s / rule.masks * 1e6 if rule.masks else None, errors=errors)

    def stats(self) -> dict:
        """Generations by status since construction (``deadline`` counts timeouts) and the mean
        grammar mask time per constrained token."""
        return {"generations": dict(self.counts), "timeouts": self.counts[DEADLINE],
                "budget_exhausted": self.counts[MAX_NEW_TOKENS], "invalid": self.counts[INVALID],
                "mask_us_per_token": self.mask_s / self.masks * 1e6 if self.masks else None}
