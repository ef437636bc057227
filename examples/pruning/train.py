"""Train the multi-domain DeepSeek-V3 language model the pruning curve is measured on.

``python -m examples.pruning.train`` (from the repository root) builds the three domains of
``corpus.py`` (Python source, English prose, plant logs), trains a byte-level BPE tokenizer
on their training splits, cuts every split into rows of ``--seq`` + 1 tokens, trains the
model from a seeded random start with ``sdk.tools.fit_lm.fit_lm`` (equal rows per domain per
step, DeepSeek-V3 bias balancing of the routers), and writes the float package
``examples/pruning/model/`` (via ``sdk.compress`` with every expert kept and no quantization)
plus the held-out rows ``examples/pruning/data/held_out.npz`` and calibration rows
``examples/pruning/data/calib_<domain>.npz`` that ``benchmarks/bench_pruning.py`` uses.

The model: MLA attention, one dense layer, then three MoE layers of 48 routed experts
(``noaux_tc``: sigmoid scores, 4 groups keep 2, top-4) and one shared expert. 48 routed
experts with top-4 let pruning go down to 4 of 48 (8.3%), the share of R1's experts that fit
one 80 GB GPU. Seeded end to end; ``--threads`` fixes torch's thread count (the result
depends on it). The time taken is in ``examples/pruning/model``'s manifest (``fit.seconds``)
and in ``examples/pruning/train_report.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from examples.pruning import corpus

HERE = Path(__file__).resolve().parent

CONFIG = dict(model_type="deepseek_v3", hidden_size=128, intermediate_size=384, moe_intermediate_size=48,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
              n_routed_experts=48, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
              kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
              max_position_embeddings=1024, routed_scaling_factor=2.5, norm_topk_prob=True,
              scoring_func="sigmoid", topk_method="noaux_tc", tie_word_embeddings=False)

log = logging.getLogger("examples.pruning.train")


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    """A byte-level BPE (``tokenizers``) with BOS/EOS, and its config files, into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>"}, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))


def to_rows(texts: list[str], tok, length: int) -> np.ndarray:
    """Each text tokenized and closed by EOS, all concatenated, cut into rows of ``length`` ids."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
        ids.append(1)
    n = len(ids) // length
    return np.asarray(ids[:n * length], dtype=np.int32).reshape(n, length)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, tokenizer and model; write the package and the evaluation data."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=1_000_000, help="training text per domain (bytes)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128, help="tokens per training row")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end after this many steps of the --steps schedule (learning rate not fully decayed)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--held-rows", type=int, default=48, help="held-out rows per domain kept for evaluation")
    ap.add_argument("--calib-rows", type=int, default=64, help="calibration rows per domain")
    ap.add_argument("--checkpoint", default=None, help="training checkpoint directory (resumable)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=str(HERE / "model"))
    ap.add_argument("--data", default=str(HERE / "data"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from runtime.model.config import ModelConfig
    from runtime.model.transformer import Transformer
    from sdk.tools.compress import compress
    from sdk.tools.fit import init_weights
    from sdk.tools.fit_lm import fit_lm, save_checkpoint

    t0 = time.perf_counter()
    texts = corpus.build(args.bytes)
    log.info("corpus: %s (%.0f s)", {d: {s: sum(map(len, v)) for s, v in sp.items()} for d, sp in texts.items()},
             time.perf_counter() - t0)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        train_tokenizer([t for d in corpus.DOMAINS for t in texts[d]["train"]], ckpt, args.vocab)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        train_rows, held_rows, calib_rows = {}, {}, {}
        for d in corpus.DOMAINS:
            rows = to_rows(texts[d]["train"], tok, args.seq + 1)
            held = to_rows(texts[d]["held_out"], tok, args.seq + 1)
            # the calibration rows are held out from training too: the last training rows
            train_rows[d], calib_rows[d] = rows[:-args.calib_rows], rows[-args.calib_rows:]
            held_rows[d] = held[np.linspace(0, len(held) - 1, min(args.held_rows, len(held))).astype(int)]
            log.info("%s: %d training rows, %d held-out rows (of %d), %d calibration rows", d,
                     len(train_rows[d]), len(held_rows[d]), len(held), len(calib_rows[d]))
        model = init_weights(Transformer(ModelConfig.from_dict({**CONFIG, "vocab_size": tok.get_vocab_size()})),
                             seed=args.seed)
        report = fit_lm(model, train_rows, {d: r[:16] for d, r in held_rows.items()}, steps=args.steps,
                        batch=args.batch, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint,
                        resume=args.resume, stop_after=args.stop_after)
        save_checkpoint(model, ckpt)
        np.savez(data / "held_out.npz", **{d: r for d, r in held_rows.items()})
        for d, r in calib_rows.items():
            np.savez(data / f"calib_{d}.npz", input_ids=r[:, :-1])
        mix = np.concatenate([calib_rows[d][i::len(corpus.DOMAINS)][:, :-1] for i, d in enumerate(corpus.DOMAINS)])
        np.savez(data / "calib_mix.npz", input_ids=mix)
        compress(ckpt, args.out, calib=data / "calib_mix.npz", quant="none", overwrite=True, progress=False)
    report.update(config=CONFIG, vocab=tok.get_vocab_size(), corpus_bytes={
        d: {s: sum(map(len, v)) for s, v in sp.items()} for d, sp in texts.items()},
        total_seconds=round(time.perf_counter() - t0, 1), command="python -m examples.pruning.train "
        + " ".join(argv if argv is not None else sys.argv[1:]))
    (HERE / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("done in %.0f s: %s", time.perf_counter() - t0, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
