"""Build the advisor's language model: a tokenizer and a small DeepSeek-V3/R1-architecture LM trained
here on generated plant states, compressed to an int8 package, and its advice scored.

``python -m examples.advisor.train`` (from the repository root) writes ``examples/advisor/model/``
(the package ``deploy.toml``'s ``[advisor]`` runs) and ``examples/advisor/report.json``;
``--eval-only`` scores the existing package again. Seeded end to end.

1. States and their right advice (``states.py``): ``--train`` states for training, ``--held-out``
   more from another seed for scoring (any whose prompt a training state also has is dropped, so
   none was trained on), the four conditions equally often.
2. Text: each state's prompt is rendered by ``prompts/advice.j2`` from the same context the
   controller builds (``sdk.service.advisor.build_context``) and put through DeepSeek-R1's chat template;
   the reply is a short reasoning inside ``<think>...</think>``, then the decision as compact JSON.
   A byte-level BPE tokenizer is trained on that text, with R1's special tokens.
3. A DeepSeek-V3/R1-architecture model (MLA, one dense layer, then MoE layers of 8 routed experts,
   top-2 ``noaux_tc`` routing, one shared expert) from a seeded random start, trained on the
   replies' tokens only (cross-entropy), single-threaded torch.
4. ``sdk.compress`` to W8A8 int8 with every expert kept, calibrated on held-out rows.
5. Scoring: the int8 package on the stream engine through ``sdk.TextGenerator``, the decision
   constrained by the grammar the controller derives from ``deploy.toml`` (``sdk.service.advisor``), the
   think budget and token limit of ``deploy.toml``; per held-out state the decision is right
   when the diagnosis and both setpoints (to the schema's resolution) are.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from examples.advisor import states as S

HERE = Path(__file__).resolve().parent
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-R1's chat template, reduced to what an advisor uses (system and user turns, assistant
# turns cut at </think>; the generation prompt opens <think> as R1's does).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

CONFIG = dict(model_type="deepseek_v3", hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
              n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
              kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
              max_position_embeddings=512, routed_scaling_factor=1.0, norm_topk_prob=True,
              scoring_func="sigmoid", topk_method="noaux_tc", tie_word_embeddings=False)

log = logging.getLogger("examples.advisor.train")


def load_deploy():
    """The example's deployment config and its advisor's prompt template and decision schema."""
    from sdk.service.advisor import PromptTemplate, decision_schema
    from sdk.service.config import DeployConfig

    cfg = DeployConfig.load(HERE / "deploy.toml", check_sources=False)
    adv = cfg.advisor
    return cfg, PromptTemplate(adv.prompt.read_text(), str(adv.prompt)), decision_schema(adv, cfg.inputs)


def make_rows(n: int, seed: int, template, live: int = 0) -> list[dict]:
    """``n`` states with their prompt, reasoning and answer: ``n - live`` steady states (the
    conditions in turn) and ``live`` sampled from the closed loop (``live.py``)."""
    from examples.advisor.live import closed_loop_states

    rng = np.random.default_rng(seed)
    states = [S.draw_state(rng, S.DIAGNOSES[i % len(S.DIAGNOSES)]) for i in range(n - live)]
    if live:
        states += closed_loop_states(live, seed)
    rows = []
    for context, diagnosis in states:
        answer = S.right_answer(context, diagnosis)
        rows.append({"prompt": template.render(context), "answer": answer,
                     "reply": S.reasoning(context, answer) + "</think>" + S.answer_text(answer),
                     "source": "live" if len(rows) >= n - live else "steady"})
    return rows


def train_tokenizer(rows: list[dict], out: Path, vocab_size: int) -> None:
    """A byte-level BPE on the rows' text with R1's special tokens, and its config files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (r[k] for r in rows for k in ("prompt", "reply"))
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size - 2, special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<think>", "</think>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE}, ensure_ascii=False, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))


def encode(rows: list[dict], tok) -> list[tuple[list[int], int]]:
    """(token ids, index of the reply's first token) per row: the prompt exactly as the advisor
    feeds it, then the reply and EOS."""
    out = []
    for r in rows:
        prompt = tok.encode_chat([{"role": "user", "content": r["prompt"]}])
        reply = tok.encode(r["reply"], add_bos=False) + tok.eos_ids[:1]
        out.append((prompt + reply, len(prompt)))
    return out


def train(ckpt: Path, seqs: list[tuple[list[int], int]], vocab: int, *, steps: int, batch: int, lr: float,
          seed: int) -> list[float]:
    """Train the model from a seeded random start; writes the checkpoint (config.json,
    model.safetensors) into ``ckpt``; returns the loss every 100 steps."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from runtime.model.config import ModelConfig
    from runtime.model.transformer import Transformer
    from sdk.tools.fit import init_weights

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**CONFIG, "vocab_size": vocab})
    model = init_weights(Transformer(cfg), seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    losses, run = [], []
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        pick = rng.choice(len(seqs), batch, replace=False)
        length = max(len(seqs[i][0]) for i in pick)
        ids = torch.zeros(batch, length, dtype=torch.long)
        target = torch.full((batch, length), -100, dtype=torch.long)
        for b, i in enumerate(pick):
            row, start = seqs[i]
            ids[b, :len(row)] = torch.tensor(row)
            target[b, start - 1:len(row) - 1] = torch.tensor(row[start:])
        logits = model.lm_head(model.hidden_states(model.model.embed_tokens(ids)))
        loss = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run.append(loss.item())
        if (step + 1) % 100 == 0:
            losses.append(float(np.mean(run)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            run = []
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              str(ckpt / "model.safetensors"))
    return losses


def score(package: Path, rows: list[dict], schema, adv, batch: int = 8) -> dict:
    """Advice of the package on ``rows`` through the advisor's own decoding settings: accuracy
    overall, per field and per condition, and the generations' statuses and speed."""
    from sdk.tools.text import TextGenerator

    gen = TextGenerator.load(package, window=adv.window, capacity=batch)
    right = Counter()
    by_cond = Counter()
    n_cond = Counter()
    by_src, n_src = Counter(), Counter()
    statuses = Counter()
    think, seconds, examples = [], 0.0, []
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        gens = gen.generate_batch([r["prompt"] for r in chunk], chat=True, max_new_tokens=adv.max_tokens,
                                  max_think_tokens=adv.max_think_tokens, schema=schema)
        for r, g in zip(chunk, gens):
            ok = S.is_right(g.decision, r["answer"])
            right.update({k: int(v) for k, v in ok.items()})
            cond = r["answer"]["diagnosis"]
            n_cond[cond] += 1
            by_cond[cond] += int(ok["all"])
            n_src[r["source"], cond] += 1
            by_src[r["source"], cond] += int(ok["all"])
            statuses[g.status] += 1
            think.append(g.think_tokens)
            if not ok["all"] and len(examples) < 5:
                examples.append({"prompt": r["prompt"], "right": r["answer"], "decision": g.decision, "text": g.text})
    seconds = time.perf_counter() - t0
    n = len(rows)
    return {"held_out_states": n, "right": right["all"] / n,
            "fields": {k: right[k] / n for k in ("diagnosis", "level_sp", "temp_sp")},
            "by_condition": {c: by_cond[c] / n_cond[c] for c in S.DIAGNOSES if n_cond[c]},
            "by_source": {f"{src}/{c}": by_src[src, c] / n_src[src, c] for src, c in sorted(n_src)},
            "statuses": dict(statuses), "think_tokens_mean": float(np.mean(think)),
            "seconds": seconds, "batch": batch, "wrong_examples": examples}


def main(argv: list[str] | None = None) -> int:
    """Build (or with ``--eval-only`` just score) the example's advisor package."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=12000, help="training states")
    ap.add_argument("--live", type=int, default=4000, help="of the training states, those from the closed loop")
    ap.add_argument("--held-out", type=int, default=1000, help="held-out states to score")
    ap.add_argument("--held-out-live", type=int, default=400, help="of the held-out states, those from the closed loop")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--out", default=str(HERE / "model"))
    ap.add_argument("--eval-only", action="store_true", help="score the existing package")
    ap.add_argument("--keep-checkpoint", metavar="DIR", help="also keep the float checkpoint there")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import sdk
    from sdk.tools.text import Tokenizer

    cfg, template, schema = load_deploy()
    rows = make_rows(args.train, args.seed, template, args.live)
    seen = {r["prompt"] for r in rows}
    held = [r for r in make_rows(args.held_out, args.seed + 1_000_003, template, args.held_out_live)
            if r["prompt"] not in seen]
    out = Path(args.out)
    report: dict = {}
    if not args.eval_only:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            ckpt.mkdir()
            train_tokenizer(rows, ckpt, args.vocab)
            tok = Tokenizer(ckpt)
            seqs = encode(rows, tok)
            log.info("%d training rows, %d tokens per row on average, vocabulary %d", len(seqs),
                     int(np.mean([len(s) for s, _ in seqs])), tok.vocab_size)
            losses = train(ckpt, seqs, tok.vocab_size, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
            calib = Path(tmp) / "calib.jsonl"
            calib.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s, _ in encode(held[:64], tok)))
            train_s = time.perf_counter() - t0
            if args.keep_checkpoint:                     # the float model, for another compression later
                shutil.copytree(ckpt, args.keep_checkpoint, dirs_exist_ok=True)
            compress = sdk.compress(ckpt, out, calib=calib, quant="int8", overwrite=True)
        report = {"train_states": args.train, "live_states": args.live, "steps": args.steps, "batch": args.batch,
                  "lr": args.lr,
                  "seed": args.seed, "vocab": tok.vocab_size, "config": CONFIG, "loss_every_100_steps": losses,
                  "train_seconds": train_s, "compress_quality": compress.get("quality")}
    result = score(out, held, schema, cfg.advisor)
    report_path = HERE / "report.json"
    if args.eval_only and report_path.is_file():
        report = json.loads(report_path.read_text())
    report["score"] = result
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out states {result['held_out_states']}: advice right {result['right']:.1%} "
          f"(diagnosis {result['fields']['diagnosis']:.1%}, level_sp {result['fields']['level_sp']:.1%}, "
          f"temp_sp {result['fields']['temp_sp']:.1%}); by condition "
          + ", ".join(f"{c} {v:.1%}" for c, v in result["by_condition"].items())
          + f"; statuses {result['statuses']}; {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
