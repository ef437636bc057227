"""Pruning's cost, measured the engine's way: the evaluation behind benchmarks/bench_pruning.py,
the keep slope r1edge compress reports, the LM trainer, and the example's corpus."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packages(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint compressed to int8 at 4 of 8 experts, its calibration, and held-out rows."""
    from sdk.tools.compress import compress

    src, _ = tiny_checkpoint
    tmp = tmp_path_factory.mktemp("pruning")
    rng = np.random.default_rng(7)
    calib = tmp / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, 97, (12, 24)))
    int8 = tmp / "int8-4"
    manifest = compress(src, int8, calib=calib, keep_experts=4, quant="int8", progress=False)
    rows = rng.integers(0, 97, (5, 17))
    return {"src": src, "calib": calib, "int8": int8, "manifest": manifest, "rows": rows, "tmp": tmp}


def test_int8_evaluation_is_what_generate_and_the_engine_compute(packages):
    """Teacher forcing on the engine: at every prefix, the greedy token is what generate picks next,
    and the per-token loss comes bit for bit from the logits the engine's prefill ends with."""
    import sdk
    from runtime.cpu.engine import Engine
    from sdk.tools.quality import evaluate_lm, token_nll

    model = sdk.load_model(packages["int8"])
    rows = packages["rows"]
    result = evaluate_lm(model, rows, batch=2)        # batches of 2: rows share the engine
    assert result["path"] == "engine" and result["argmax"].shape == (5, 16)
    for t in (1, 5, 16):
        out = model.generate(torch.from_numpy(rows[:, :t]), max_new_tokens=1)
        assert out[:, -1].tolist() == result["argmax"][:, t - 1].tolist()
    engine = Engine(model, capacity=1, window=32)
    nll = []
    for r in rows:
        for t in range(1, 17):
            engine.reset_slot(0)
            logits = engine.prefill(0, r[:t]).copy()
            nll.append(token_nll(logits[None], r[t:t + 1])[0][0])
    assert np.array_equal(np.array(nll), result["nll"].reshape(-1))
    assert result["loss"] == float(result["nll"].mean())


def test_float_evaluation_is_the_reference_forward(tiny_checkpoint, packages):
    import torch.nn.functional as F

    import sdk
    from sdk.tools.quality import evaluate_lm

    model = sdk.load_model(tiny_checkpoint[0])
    rows = packages["rows"]
    result = evaluate_lm(model, rows)
    assert result["path"] == "reference"
    ids = torch.from_numpy(rows)
    logits = model(ids[:, :-1])
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))),
                                           rel=1e-6)
    assert np.array_equal(result["argmax"], logits.argmax(-1).numpy())
    for t in (1, 9):
        assert model.generate(ids[:, :t], max_new_tokens=1)[:, -1].tolist() == result["argmax"][:, t - 1].tolist()


def test_evaluation_refuses_bad_rows(packages):
    import sdk
    from sdk.tools.quality import evaluate_lm

    model = sdk.load_model(packages["int8"])
    with pytest.raises(ValueError, match=r"\[N, T\+1\]"):
        evaluate_lm(model, np.zeros((3,), np.int64))
    with pytest.raises(ValueError, match="0..96"):
        evaluate_lm(model, np.full((1, 4), 97))


def test_neighbour_keeps():
    from sdk.tools.slope import neighbour_keeps

    assert neighbour_keeps(48, 4, 12) == [6, 24]
    assert neighbour_keeps(48, 4, 4) == [8]
    assert neighbour_keeps(48, 4, 48) == [24]
    assert neighbour_keeps(8, 2, 5) == [2, 8]


def test_compress_reports_the_slope_around_the_chosen_keep(packages, capsys):
    """r1edge compress --json: the chosen package's loss and its neighbours' (half and twice the
    experts), each against the unpruned float model, on the held-out calibration rows; each
    neighbour's figures are those of a package compressed at that count."""
    from sdk.cli import main
    from sdk.tools.compress import compress
    from sdk.tools.slope import render_slope

    out = packages["tmp"] / "cli-4"
    rc = main(["compress", str(packages["src"]), "--out", str(out), "--calib", str(packages["calib"]),
               "--keep-experts", "4", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    slope = report["keep_slope"]
    assert [p["keep_experts"] for p in slope] == [2, 4, 8]
    assert [p["chosen"] for p in slope] == [False, True, False]
    q = report["quality"]
    assert slope[1]["loss"] == q["nll_compressed"] and slope[1]["loss_unpruned_float"] == q["nll_original"]
    assert len({p["loss_unpruned_float"] for p in slope}) == 1        # the same held-out rows and reference
    two = compress(packages["src"], packages["tmp"] / "two", calib=packages["calib"], keep_experts=2,
                   progress=False)
    assert slope[0]["loss"] == two["quality"]["nll_compressed"]
    assert slope[0]["agreement"] == two["quality"]["greedy_agreement"]
    assert slope[2]["keep_ratio"] == 1.0 and slope[0]["loss"] > slope[2]["loss"]
    render_slope(slope)
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("What the neighbouring keep ratios cost") and len(text) == 4
    assert "keep    4 ( 50.0%) int8" in text[2] and text[2].endswith("<- this package")


def test_plan_points_to_the_quality_report(tiny_checkpoint, capsys):
    from sdk.cli import main

    assert main(["plan", str(tiny_checkpoint[0]), "--json"]) == 0
    assert "r1edge compress reports the held-out loss" in json.loads(capsys.readouterr().out)["quality"]
    assert main(["plan", str(tiny_checkpoint[0])]) == 0
    assert "r1edge compress reports the held-out loss" in capsys.readouterr().out


def test_fit_lm_learns_balances_and_is_seeded():
    from runtime.model.config import ModelConfig
    from runtime.model.transformer import Transformer
    from sdk.tools.fit import init_weights
    from sdk.tools.fit_lm import fit_lm, held_out_loss

    cfg = dict(vocab_size=32, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
               num_attention_heads=2, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
               topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
               qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    # two "domains" with different, learnable structure: counting up by 1 and by 3
    a = (rng.integers(0, 32, (40, 1)) + np.arange(17)) % 32
    b = (rng.integers(0, 32, (40, 1)) + 3 * np.arange(17)) % 32
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = init_weights(Transformer(ModelConfig(**cfg)), seed=3)
        before = held_out_loss(m, torch.from_numpy(a[:8]))
        report = fit_lm(m, {"a": a, "b": b}, {"a": a[:8]}, steps=30, batch=8, lr=1e-2, eval_every=15,
                        progress=False)
        models.append(m)
    assert report["history"][-1]["held_out"]["a"] < before - 0.5
    assert [h["step"] for h in report["history"]] == [15, 30]
    bias = models[0].model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0                                  # the balancer moved the router
    for (k, v), w in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="multiple of the 2 domains"):
        fit_lm(models[0], {"a": a, "b": b}, batch=7)
    with pytest.raises(ValueError, match=r"train\['a'\]: token ids must be in \[0, 32\)"):
        fit_lm(models[0], {"a": a + 32, "b": b}, batch=8)


def test_bench_rows_are_the_engines_figures(tiny_checkpoint, packages, tmp_path):
    """The benchmark's JSON has exactly the contract's keys, and its int8 figures are evaluate_lm's
    (the engine's) on the package compress writes for that row."""
    import sdk
    from sdk.tools.compress import compress
    from sdk.tools.quality import agreement, evaluate_lm

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pruning

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    held = {"x": rng.integers(0, 97, (3, 13)), "y": rng.integers(0, 50, (3, 13))}
    np.savez(data / "held_out.npz", **held)
    for c in ("mix", "x", "y"):
        np.savez(data / f"calib_{c}.npz", input_ids=rng.integers(0, 97, (8, 16)))
    out = tmp_path / "curve.json"
    assert bench_pruning.main(["--package", str(tiny_checkpoint[0]), "--data", str(data), "--keeps", "1,min",
                               "--methods", "reap,random", "--calibs", "x", "--json", str(out),
                               "--plot", str(tmp_path / "c.png")]) == 0
    curve = json.loads(out.read_text())
    assert set(curve) == {"domains", "rows"} and curve["domains"] == ["x", "y"]
    assert all(set(r) == {"domain", "method", "calib", "keep", "quant", "loss", "agreement"} for r in curve["rows"])
    lines = {(r["method"], r["calib"]) for r in curve["rows"]}
    assert lines == {("reap", "x"), ("random", "mix")}         # random choice ignores the calibration
    assert len(curve["rows"]) == 2 * 2 * 2 * len(lines)                 # domains x keeps x quants x lines
    row = next(r for r in curve["rows"] if (r["domain"], r["method"], r["calib"], r["quant"], r["keep"])
               == ("y", "reap", "x", "int8", 0.25))
    pkg = tmp_path / "again"
    compress(tiny_checkpoint[0], pkg, calib=data / "calib_x.npz", keep_experts=2, quant="int8", progress=False)
    mine = evaluate_lm(sdk.load_model(pkg), held["y"])
    ref = evaluate_lm(sdk.load_model(tiny_checkpoint[0]), held["y"])
    assert row["loss"] == mine["loss"] and row["agreement"] == agreement(mine["argmax"], ref["argmax"])
    assert (tmp_path / "c.png").stat().st_size > 10_000
