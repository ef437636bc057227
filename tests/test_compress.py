"""Compression: calibration files, pruning by REAP/frequency/random, int8 packages, streaming memory."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdk
from runtime.model.config import ModelConfig
from runtime.model.transformer import Transformer
from sdk.tools.compress import CalibrationError, compress, load_calibration
from sdk.tools.package import PackageError, read_manifest


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, expect", [
    (['{"input_ids": [1, 2]}', '{"input_ids": [1, 2'], r":2: not valid JSON"),
    (['{"input_ids": [1, 2]}', '', '{"tokens": [3]}'], r":3: missing key 'input_ids'"),
    (['[1, 2, 3]'], r":1: expected an object"),
    (['{"input_ids": [1, 2]}', '{"input_ids": []}'], r":2: 'input_ids' must be a non-empty list"),
    (['{"input_ids": [1, "2"]}'], r":1: 'input_ids' must be a non-empty list of integers"),
    (['{"input_ids": [1, true]}'], r":1: 'input_ids' must be a non-empty list of integers"),
    (['{"input_ids": [1, 2]}', '{"input_ids": [5, 97]}'], r":2: 'input_ids': token id 97 is out of range"),
    (['{"input_ids": [-1]}'], r":1: 'input_ids': negative token id"),
    (['{"input_ids": [99999999999999999999999]}'], r":1: 'input_ids' holds an integer too large"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, expect):
    path = _write_jsonl(tmp_path / "calib.jsonl", lines)
    with pytest.raises(CalibrationError, match=expect) as err:
        load_calibration(path, vocab_size=97)
    assert str(path) in str(err.value)


def test_malformed_arrays_name_the_key(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(CalibrationError, match="integer array"):
        load_calibration(tmp_path / "f.npy")
    np.save(tmp_path / "v.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"\[N, T\]"):
        load_calibration(tmp_path / "v.npy")
    np.save(tmp_path / "obj.npy", np.array([[1], [2, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="pickled arrays are refused"):
        load_calibration(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2), dtype=np.int64), b=np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"expected key 'input_ids'.*\['a', 'b'\]"):
        load_calibration(tmp_path / "two.npz")
    np.savez(tmp_path / "ids.npz", input_ids=np.full((2, 4), 200, dtype=np.int32))
    with pytest.raises(CalibrationError, match="key 'input_ids': token id 200"):
        load_calibration(tmp_path / "ids.npz", vocab_size=97)
    frames = np.zeros((2, 5, 3), dtype=np.float32)
    frames[1, 4, 2] = np.nan
    np.savez(tmp_path / "nan.npz", frames=frames)
    with pytest.raises(CalibrationError, match=r"key 'frames': non-finite value at \[1, 4, 2\]"):
        load_calibration(tmp_path / "nan.npz")
    np.savez(tmp_path / "wide.npz", frames=np.zeros((2, 5, 4), dtype=np.float32))
    with pytest.raises(CalibrationError, match="key 'frames': frames have 4 features.*takes 3"):
        load_calibration(tmp_path / "wide.npz", n_features=3)
    np.savez(tmp_path / "int_frames.npz", frames=np.zeros((2, 5, 3), dtype=np.int64))
    with pytest.raises(CalibrationError, match="key 'frames'.*float array"):
        load_calibration(tmp_path / "int_frames.npz")
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(CalibrationError, match="unsupported calibration format '.csv'"):
        load_calibration(tmp_path / "c.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="bad.npz"):
        load_calibration(tmp_path / "bad.npz")


def test_valid_files_in_every_format(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [json.dumps({"input_ids": [1, 2, 3]}), "",
                                                json.dumps({"input_ids": [4, 5]})])
    cal = load_calibration(path, vocab_size=97)
    assert cal.mode == "lm" and [r.tolist() for r in cal.rows] == [[1, 2, 3], [4, 5]] and cal.tokens == 5
    np.save(tmp_path / "c.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    cal = load_calibration(tmp_path / "c.npy", vocab_size=97)
    assert len(cal.rows) == 3 and cal.rows[2].tolist() == [8, 9, 10, 11]
    fit, held = cal.split(0.25)
    assert len(fit.rows) == 2 and len(held.rows) == 1
    np.savez(tmp_path / "s.npz", frames=np.ones((4, 6, 3), dtype=np.float64))
    cal = load_calibration(tmp_path / "s.npz", n_features=3)
    assert cal.mode == "sensor" and cal.n_features == 3 and cal.tokens == 24


# --------------------------------------------------------------------------------------------
# Helpers: checkpoints in the HF layout (routed experts one by one), as real releases ship
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny models train and run far faster on one thread, and results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The runtime's stacked experts split into HF per-expert ``gate/up/down_proj`` tensors."""
    out, inter = {}, cfg.moe_intermediate_size
    for name, t in state.items():
        t = t.detach()
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone().contiguous()
    return out


def save_hf(model: Transformer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(model.state_dict(), model.config), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    return path


# --------------------------------------------------------------------------------------------
# REAP vs frequency vs random on a small MoE whose experts specialise
# --------------------------------------------------------------------------------------------

N_TASKS, TASK_TOKENS = 8, 8
# Tasks 0-3 repeat the current token; tasks 4-7 map it through their own permutation.
# Task 0 is frequent, 1-3 rare; the four permutation tasks share the rest.
TASK_FREQ = torch.tensor([0.25, 0.02, 0.02, 0.02] + [0.1725] * 4)
N_EASY = 4


def _task_rows(n: int, T: int, gen: torch.Generator, perms: torch.Tensor) -> torch.Tensor:
    task = torch.multinomial(TASK_FREQ, n, replacement=True, generator=gen)
    x = torch.randint(0, TASK_TOKENS, (n,), generator=gen)
    rows = torch.empty(n, T, dtype=torch.long)
    for t in range(T):
        rows[:, t] = x + task * TASK_TOKENS
        x = torch.where(task < N_EASY, x, perms[task, x])
    return rows


def _train_specialised_moe(seed: int = 0, steps: int = 300) -> tuple[Transformer, torch.Tensor]:
    """One MoE layer, 8 experts, top-1, trained ~2 s on 8 token tasks, one expert per task.

    The token embeddings carry a direction per task and the (frozen) router rows point
    along them, so expert e serves task e. Embeddings and lm_head are frozen and equal,
    so "repeat the token" (tasks 0-3) needs no expert at all and weight decay shrinks
    those experts, while each permutation task (4-7) is only solvable by its expert.
    """
    vocab, hidden = N_TASKS * TASK_TOKENS, 32
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, moe_intermediate_size=32,
                      num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=2,
                      n_routed_experts=N_TASKS, n_shared_experts=0, num_experts_per_tok=1, n_group=1,
                      topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                      qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
                      routed_scaling_factor=1.0, norm_topk_prob=False)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, 0, 0.1)
    directions = torch.linalg.qr(torch.randn(hidden, N_TASKS + 1))[0].T
    task_dir, common = directions[:N_TASKS], directions[N_TASKS]
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        emb = 2.0 * task_dir[torch.arange(vocab) // TASK_TOKENS] + 2.0 * common + 0.3 * torch.randn(vocab, hidden)
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(emb)
        gate.weight.copy_(6.0 * (task_dir - 0.5 * common))
    for p in (model.model.embed_tokens.weight, model.lm_head.weight, gate.weight):
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1.0)
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(TASK_TOKENS, generator=gen) for _ in range(N_TASKS)])
    for _ in range(steps):
        ids = _task_rows(32, 16, gen, perms)
        logits = model.lm_head(model.hidden_states(model.model.embed_tokens(ids)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), perms


def test_reap_beats_frequency_beats_random_on_specialised_experts(tmp_path, one_thread):
    """Prune 8 -> 4 experts by each method; compare on held-out rows against the data.

    REAP keeps the four permutation experts (large gate x output norm). Frequency keeps
    expert 0, the most chosen (a quarter of all tokens) though it matters less (the tied
    embeddings already repeat a token), plus the three busiest permutation experts. Random keeps on average two permutation
    experts (frequency sits in between because the permutation experts it keeps are the
    busiest ones). So REAP < frequency < random in held-out loss.
    """
    model, perms = _train_specialised_moe()
    src = save_hf(model, tmp_path / "moe")
    gen = torch.Generator().manual_seed(123)
    np.save(tmp_path / "calib.npy", _task_rows(128, 16, gen, perms).numpy())
    runs = {}
    for method, seed in [("reap", 0), ("frequency", 0)] + [("random", s) for s in range(4)]:
        man = compress(src, tmp_path / f"{method}{seed}", calib=tmp_path / "calib.npy", keep_experts=4,
                       quant="none", method=method, seed=seed, held_out=0.5, progress=False)
        runs[(method, seed)] = man
    q = {k: m["quality"] for k, m in runs.items()}
    reap, freq = q[("reap", 0)], q[("frequency", 0)]
    rand = [q[("random", s)] for s in range(4)]
    nll_rand = sum(r["nll_compressed"] for r in rand) / len(rand)
    agree_rand = sum(r["greedy_agreement"] for r in rand) / len(rand)
    summary = {k: (round(v["nll_compressed"], 3), round(v["greedy_agreement"], 3)) for k, v in q.items()}
    print("held-out NLL / greedy agreement:", summary, "original NLL", round(reap["nll_original"], 3))
    # Which experts each method kept (their original ids).
    assert runs[("reap", 0)]["experts"]["kept"]["0"] == [4, 5, 6, 7]
    assert 0 in runs[("frequency", 0)]["experts"]["kept"]["0"]
    stats = runs[("reap", 0)]["calibration"]["layers"]["0"]
    assert stats["counts"][0] == max(stats["counts"])
    assert stats["saliency"][0] < min(stats["saliency"][4:])
    # Measured (training seed 0, 64 held-out rows): held-out NLL original 0.034, reap 0.080,
    # frequency 0.555, random 0.76-1.98 (mean 1.54); greedy agreement with the original
    # reap 1.000, frequency 0.891, random mean 0.688.
    assert reap["nll_compressed"] < 0.6 * freq["nll_compressed"]
    assert freq["nll_compressed"] < 0.8 * nll_rand
    assert reap["nll_compressed"] < min(r["nll_compressed"] for r in rand)
    assert reap["greedy_agreement"] > freq["greedy_agreement"] > agree_rand + 0.05


# --------------------------------------------------------------------------------------------
# Streaming: peak memory is about one layer, not the model; int8 package size; loading
# --------------------------------------------------------------------------------------------

BIG = dict(vocab_size=128, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
           num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=32,
           n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=64,
           q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
           max_position_embeddings=256)


def _write_sharded_checkpoint(path: Path, cfg: ModelConfig, seed: int = 0) -> int:
    """A random float32 checkpoint, one safetensors file per layer, written layer by layer."""
    path.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = shape
    for i, (key, names) in enumerate(shards.items()):
        tensors = {}
        for name, shape in names.items():
            if "norm" in name:
                tensors[name] = torch.ones(shape)
            elif name.endswith("e_score_correction_bias"):
                tensors[name] = 0.1 * torch.rand(shape, generator=gen)
            else:
                tensors[name] = 0.05 * torch.randn(shape, generator=gen)
        save_file(hf_tensors(tensors, cfg), path / f"model-{i:05d}.safetensors")
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


_MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    torch.set_num_threads(1)
    from sdk.tools.compress import compress

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    warm, warm_calib, src, out, calib = sys.argv[1:6]
    # Warm up imports, Numba kernels and allocator pools on a tiny model first.
    compress(warm, out + "-warm", calib=warm_calib, quant="int8", progress=False)
    base = status()
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in status().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    manifest = compress(src, out, calib=calib, quant="int8", progress=False)
    done.set()
    thread.join()
    print(json.dumps({"base": base, "peak": peak, "size": manifest["size"]}))
""")


def test_streaming_compress_memory_int8_size_and_load(tmp_path, tiny_checkpoint, one_thread):
    """A 190 MB float32 checkpoint compresses to int8 while anonymous memory grows by less
    than three of its layers (77 MB); the package is under 0.3x the checkpoint and loads and runs, giving
    exactly what quantizing the checkpoint on load gives.

    Peak growth is measured as resident anonymous memory (RssAnon), sampled every 2 ms in
    a subprocess: the source is memory-mapped, so its pages count in RSS as file-backed,
    reclaimable page cache (RssFile grows by about the checkpoint size) and are not memory
    the compress step holds.
    """
    cfg = ModelConfig(**BIG)
    ckpt_bytes = _write_sharded_checkpoint(tmp_path / "big", cfg)
    largest_layer = max(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    allowed = 3 * largest_layer
    assert ckpt_bytes > 2 * allowed
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.integers(0, cfg.vocab_size, (16, 32)))
    np.save(tmp_path / "warm.npy", rng.integers(0, 97, (4, 8)))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tiny_checkpoint[0]), str(tmp_path / "warm.npy"),
                           str(tmp_path / "big"), str(tmp_path / "pkg"), str(tmp_path / "calib.npy")],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["peak"]["RssAnon"] - m["base"]["RssAnon"]
    print(f"checkpoint {ckpt_bytes / 1e6:.0f} MB; anonymous memory growth {growth / 1e6:.1f} MB "
          f"(allowed {allowed / 1e6:.0f} MB); file-backed growth "
          f"{(m['peak']['RssFile'] - m['base']['RssFile']) / 1e6:.0f} MB; package {m['size']['ratio']:.3f}x")
    assert growth < allowed         # measured: 41-45 MB, 1.6-1.8 source layers of 25.6 MB
    assert m["size"]["ratio"] <= 0.3
    pkg_bytes = sum(f.stat().st_size for f in (tmp_path / "pkg").glob("*.safetensors"))
    assert pkg_bytes == m["size"]["package_bytes"] and pkg_bytes <= 0.3 * ckpt_bytes

    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (2, 9)))
    package = sdk.load_model(tmp_path / "pkg")
    on_load = sdk.load_model(tmp_path / "big", quant="int8")
    assert torch.equal(package(ids), on_load(ids))
    assert torch.equal(package.generate(ids, max_new_tokens=4), on_load.generate(ids, max_new_tokens=4))


# --------------------------------------------------------------------------------------------
# The pruned router, tampering, bad calibration, the CLI, sensor mode
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    gen = torch.Generator().manual_seed(7)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, 97, (12,), generator=gen).tolist()}) + "\n"
                            for _ in range(8)))
    return path


def _reference_routing(x, weight, bias, kept, rule, n_group, topk_group, k, scaling):
    """noaux_tc routing of the ORIGINAL router restricted to the kept experts (plain torch).

    Dropped experts get -inf scores; with ``balanced`` the original groups stay, with
    ``global`` all experts form one group. Returns original ids and weights, sorted by id.
    """
    s = torch.sigmoid(x @ weight.T)
    biased = s + bias
    mask = torch.full_like(biased, float("-inf"))
    mask[:, kept] = 0
    biased = biased + mask
    if rule == "balanced":
        groups = biased.view(x.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)
        chosen = groups.topk(topk_group, dim=-1)[1]
        keep_group = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, chosen, True)
        biased = biased.masked_fill(~keep_group.repeat_interleave(weight.shape[0] // n_group, dim=1), float("-inf"))
    idx = biased.topk(k, dim=-1)[1]
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * scaling
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("keep, rule", [(4, "balanced"), (6, "balanced"), (3, "global"), (2, "global")])
def test_pruned_router_routes_like_the_original_among_kept_experts(tmp_path, tiny_checkpoint, tiny_calib,
                                                                   keep, rule, one_thread):
    """Gate rows and correction bias follow the kept experts; group-limited routing stays valid.

    The tiny model has 8 experts in 2 groups (keep 1 group, top-2). Keeping 4 or 6 keeps
    2 or 3 per group (balanced); 3 cannot be split evenly and 2 would leave one expert a
    group (the group score is a top-2 sum), so those collapse to a single group (global).
    """
    src, ref = tiny_checkpoint
    man = compress(src, tmp_path / "pkg", calib=tiny_calib, keep_experts=keep, quant="none", progress=False)
    groups = man["experts"]["groups"]
    assert groups["rule"] == rule
    cfg = man["config"]
    assert cfg["n_routed_experts"] == keep
    assert (cfg["n_group"], cfg["topk_group"]) == ((2, 1) if rule == "balanced" else (1, 1))
    model = sdk.load_model(tmp_path / "pkg")
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    for layer, kept in man["experts"]["kept"].items():
        assert len(kept) == keep and len(set(kept)) == keep
        if rule == "balanced":   # new group g holds keep/2 experts of old group g
            assert all(e // 4 == i // (keep // 2) for i, e in enumerate(kept))
        hf_gate = ref.model.layers[int(layer)].mlp.gate
        gate = model.model.layers[int(layer)].mlp.gate
        assert torch.equal(gate.weight, hf_gate.weight[kept])
        assert torch.equal(gate.e_score_correction_bias, hf_gate.e_score_correction_bias[kept])
        idx, w = gate(x)
        order = idx.argsort(dim=-1)
        got_ids = torch.tensor(kept)[idx.gather(1, order)]
        want_ids, want_w = _reference_routing(x, hf_gate.weight, hf_gate.e_score_correction_bias, kept, rule,
                                              2, 1, 2, 2.5)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(w.gather(1, order), want_w)
    # The int8 package of the same pruning runs through the engine's Numba router.
    compress(src, tmp_path / "q8", calib=tiny_calib, keep_experts=keep, progress=False)
    out = sdk.load_model(tmp_path / "q8").generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_balanced_groups_refused_when_impossible(tmp_path, tiny_checkpoint, tiny_calib):
    with pytest.raises(ValueError, match="cannot keep 3 experts in 2 equal groups"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tiny_calib, keep_experts=3, groups="balanced")
    with pytest.raises(ValueError, match="keep-experts must be an integer between num_experts_per_tok=2"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tiny_calib, keep_experts=1)
    with pytest.raises(ValueError, match="either --keep-experts or --keep-ratio"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tiny_calib, keep_experts=4, keep_ratio=0.5)
    assert not (tmp_path / "pkg").exists()


def test_tampered_or_missing_weight_file_is_refused_naming_it(tmp_path, tiny_checkpoint, tiny_calib, one_thread):
    pkg = tmp_path / "pkg"
    compress(tiny_checkpoint[0], pkg, calib=tiny_calib, keep_experts=4, progress=False)
    files = [f for f in read_manifest(pkg)["files"] if f.endswith(".safetensors")]
    assert len(files) == 5       # embeddings, 3 layers, head
    for name in files:
        path = pkg / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        with pytest.raises(PackageError, match="sha256 does not match") as err:
            sdk.load_model(pkg)
        assert str(path) in str(err.value)
        path.unlink()
        with pytest.raises(PackageError, match="missing") as err:
            sdk.load_model(pkg)
        assert str(path) in str(err.value)
        path.write_bytes(original)
    sdk.load_model(pkg)


def test_malformed_calibration_is_refused_before_any_work(tmp_path, tiny_checkpoint, monkeypatch):
    """The calibration file is validated before a single weight is read or a file written."""
    import runtime.model.weights

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were opened before the calibration file was checked")

    monkeypatch.setattr(runtime.model.weights, "CheckpointReader", no_reading)
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"input_ids": [1, 2, 3]}', '{"input_ids": [4, 500]}'])
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: 'input_ids': token id 500 is out of range"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=bad)
    np.savez(tmp_path / "sensor.npz", frames=np.zeros((2, 4, 3), dtype=np.float32))
    with pytest.raises(CalibrationError, match="sensor 'frames'.*no I/O adapter"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tmp_path / "sensor.npz")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tmp_path / "nope.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "sensor.npz"]


def test_cli_compress_prints_the_report_and_plans_the_package(tmp_path, tiny_checkpoint, tiny_calib, capsys,
                                                             one_thread):
    from sdk import cli

    pkg = tmp_path / "pkg"
    assert cli.main(["compress", str(tiny_checkpoint[0]), "--out", str(pkg), "--calib", str(tiny_calib),
                     "--keep-ratio", "0.5", "--method", "frequency"]) == 0
    text = capsys.readouterr().out
    for line in ("Experts kept per MoE layer (frequency, of 8", "layer   1:    4", "layer   2:    4",
                 "Quantization: w8a8-int8", "Size: ", "greedy-token agreement", "logits cosine"):
        assert line in text, line
    assert cli.main(["compress", str(tiny_checkpoint[0]), "--out", str(tmp_path / "j"), "--calib", str(tiny_calib),
                     "--keep-experts", "6", "--quant", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["n_routed_experts"] == 6 and report["quantization"]["scheme"] == "none"
    assert {"greedy_agreement", "logits_cosine"} <= set(report["quality"])
    assert report["size"]["package_bytes"] < report["size"]["source_bytes"]
    # A malformed calibration file: exit status 2 and the line in the message.
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"input_ids": [1]}', "{oops"])
    assert cli.main(["compress", str(tiny_checkpoint[0]), "--out", str(tmp_path / "x"), "--calib", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compress", str(tiny_checkpoint[0]), "--out", str(tmp_path / "x"), "--calib", str(tiny_calib),
                  "--keep-experts", "4", "--keep-ratio", "0.5"])
    # The planner reads the package's own (pruned) config.
    assert cli.main(["plan", str(pkg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["keep_experts"] == 4 and plan["quant"] == "int8"


def test_sensor_package_compresses_with_output_quality(tmp_path, one_thread):
    """A float sensor package (I/O adapter) compresses from frames; the quality report
    compares outputs: MSE and decision agreement; the int8 package runs in sensor mode."""
    from runtime.model.transformer import IOAdapter
    from sdk.tools.package import FORMAT, FORMAT_VERSION, write_package

    cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=8,
                      q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                      max_position_embeddings=64)
    torch.manual_seed(3)
    model = Transformer(cfg)
    model.adapter = IOAdapter(["level", "flow", "temp"], ["valve", "pump"], cfg.hidden_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() >= 2 else p.uniform_(0.8, 1.2)
        model.adapter.out_std.fill_(2.0)
    kept_all = {str(i): list(range(8)) for i in range(1, 2)}
    write_package(tmp_path / "float", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
        "quantization": {"scheme": "none"}, "io": model.adapter.signature(),
        "experts": {"kept": kept_all, "original_n_routed_experts": 8, "method": None},
        "calibration": None, "quality": None}, model.state_dict())
    frames = np.random.default_rng(0).normal(size=(12, 16, 3)).astype(np.float32)
    np.savez(tmp_path / "frames.npz", frames=frames)
    man = compress(tmp_path / "float", tmp_path / "q8", calib=tmp_path / "frames.npz", keep_experts=4,
                   progress=False)
    q = man["quality"]
    assert q["mode"] == "sensor" and q["frames"] == 3 * 16
    assert set(q["per_output_mse"]) == set(q["outputs"]) == {"valve", "pump"}
    assert man["io"] == {"inputs": ["level", "flow", "temp"], "outputs": ["valve", "pump"]}
    loaded = sdk.load_model(tmp_path / "q8")
    x = torch.from_numpy(frames[-3:])
    with torch.no_grad():
        out, ref = loaded.forward_sensor(x), model.forward_sensor(x)
    assert out.shape == (3, 16, 2)
    # The report's MSE is the MSE of exactly these outputs against the float model's.
    assert abs(float((out - ref).double().pow(2).mean()) - q["output_mse"]) < 1e-6 * max(1.0, q["output_mse"])
    # Per output, the measures of r1edge eval, relative to the span of the float model's outputs.
    for j, name in enumerate(["valve", "pump"]):
        err, r = (out - ref).double()[..., j], ref.double()[..., j]
        e = q["outputs"][name]
        assert e["rms"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-4)
        assert e["max_abs"] == pytest.approx(float(err.abs().max()), rel=1e-4)
        assert e["rms_frac_range"] == pytest.approx(e["rms"] / float(r.max() - r.min()), rel=1e-4)
    # A second compression of the compressed-from package composes the kept-expert maps.
    man2 = compress(tmp_path / "float", tmp_path / "f4", calib=tmp_path / "frames.npz", keep_experts=4,
                    quant="none", progress=False)
    man3 = compress(tmp_path / "f4", tmp_path / "f2", calib=tmp_path / "frames.npz", keep_experts=2,
                    quant="none", progress=False)
    assert set(man3["experts"]["kept"]["1"]) <= set(man2["experts"]["kept"]["1"])
    assert man3["experts"]["original_n_routed_experts"] == 8


@pytest.mark.parametrize("quant", ["int8", "none"])
def test_quality_report_is_what_the_package_does(tmp_path, tiny_checkpoint, quant, one_thread):
    """Re-measure the report independently: the loaded package against the loaded source,
    on the held-out rows. A bf16 source gives a package with bf16 float weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = tmp_path / "bf16"
    src.mkdir()
    save_file({k: v.to(torch.bfloat16) if v.dim() >= 2 and ".mlp.gate." not in k else v
               for k, v in load_file(tiny_checkpoint[0] / "model.safetensors").items()}, src / "model.safetensors")
    (src / "config.json").write_text((tiny_checkpoint[0] / "config.json").read_text())
    rows = torch.randint(0, 97, (8, 10), generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "calib.npy", rows.numpy())
    man = compress(src, tmp_path / "pkg", calib=tmp_path / "calib.npy", keep_experts=6, quant=quant,
                   held_out=0.25, progress=False)
    with safe_open(str(tmp_path / "pkg" / "model-embed.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    held = rows[-2:]
    with torch.no_grad():
        a = sdk.load_model(tmp_path / "pkg")(held)
        b = sdk.load_model(src)(held)
    q = man["quality"]
    assert q["tokens"] == held.numel() and q["held_out_rows"] == 2
    assert q["greedy_agreement"] == pytest.approx(float((a.argmax(-1) == b.argmax(-1)).double().mean()), abs=1e-9)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).double().mean()
    assert q["logits_cosine"] == pytest.approx(float(cos), abs=1e-5)
    nll = torch.nn.functional.cross_entropy(a[:, :-1].reshape(-1, 97), held[:, 1:].reshape(-1))
    assert q["nll_compressed"] == pytest.approx(float(nll), abs=1e-4)


def test_bad_source_or_failure_midway_leaves_no_package(tmp_path, tiny_checkpoint, tiny_calib, monkeypatch,
                                                         one_thread):
    """A missing source tensor is named before any work; a failure half-way leaves nothing at
    --out but keeps the finished layers beside it, and the same command then resumes and
    gives exactly the package of an uninterrupted run."""
    from safetensors.torch import load_file

    streamed = importlib.import_module("sdk.tools.streamed")

    src = tmp_path / "src"
    src.mkdir()
    tensors = load_file(tiny_checkpoint[0] / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text((tiny_checkpoint[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="'model.layers.2.mlp.experts.5.up_proj.weight' is missing"):
        compress(src, tmp_path / "pkg", calib=tiny_calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    real = streamed.moe_compressed

    def failing_at_layer_2(p, i, *args):
        if i == 2:
            raise RuntimeError("disk full")
        return real(p, i, *args)

    monkeypatch.setattr(streamed, "moe_compressed", failing_at_layer_2)
    with pytest.raises(RuntimeError, match="disk full"):
        compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tiny_calib, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pkg.partial", "src"]
    state = json.loads((tmp_path / ".pkg.partial" / "state.json").read_text())
    assert state["next"] == 2 and sorted(state["files"]) == ["model-embed.safetensors", "model-layer-000.safetensors",
                                                             "model-layer-001.safetensors"]
    monkeypatch.undo()
    resumed = compress(tiny_checkpoint[0], tmp_path / "pkg", calib=tiny_calib, progress=False)
    whole = compress(tiny_checkpoint[0], tmp_path / "whole", calib=tiny_calib, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "src", "whole"]
    assert resumed == whole
    for name in list(whole["files"]) + ["manifest.json"]:
        assert (tmp_path / "pkg" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("family", ["v3", "v2"])
def test_balanced_groups_follow_the_routing_rules_one_check(family):
    """Pruning keeps the groups balanced exactly when the routing rule accepts the pruned router
    (``RoutingRule.check``, the one validity check). A group_limited_greedy group scores its
    largest expert, so one kept expert per group is a valid balanced router; a noaux_tc group
    scores the sum of its top two, so it needs two."""
    from tests.conftest import TINY, TINY_V2
    from runtime.model.routing import RoutingRule
    from sdk.tools.compress import group_plan

    raw = {**(TINY_V2 if family == "v2" else TINY), "model_type": f"deepseek_{family}"}
    cfg = ModelConfig.from_dict(raw)
    rule = RoutingRule.from_config(cfg)
    for keep in range(cfg.num_experts_per_tok, cfg.n_routed_experts + 1):
        try:
            RoutingRule.from_config(cfg, n_experts=keep)
            accepted = True
        except ValueError:
            accepted = False
        plan = group_plan(cfg, keep)
        assert (plan["rule"] == "balanced") == accepted, (keep, plan)
        if accepted:
            assert (plan["n_group"], plan["topk_group"], plan["per_group"]) == (
                rule.n_group, rule.topk_group, keep // rule.n_group)
    one_per_group = group_plan(cfg, cfg.n_group, "auto")
    if family == "v2":      # group_limited_greedy: 4 groups of 1 kept, top-2 of 2 kept groups
        assert one_per_group == {"rule": "balanced", "n_group": 4, "topk_group": 2, "per_group": 1}
        assert group_plan(cfg, 4, "balanced")["per_group"] == 1
    else:
        assert one_per_group["rule"] == "global"
        with pytest.raises(ValueError, match="cannot keep 2 experts in 2 equal groups"):
            group_plan(cfg, 2, "balanced")
