"""Checkpoint loading: sharded files, the official FP8 block format, both config spellings, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from runtime.model.weights import FP8_BLOCK, CheckpointError
from transformers import DeepseekV3ForCausalLM

from tests.conftest import save_reference

# Wide enough that 128x128 FP8 blocks include partial edge blocks.
FP8_DIMS = dict(hidden_size=160, moe_intermediate_size=136, intermediate_size=200, q_lora_rank=144,
                kv_lora_rank=130, num_attention_heads=2, num_key_value_heads=2)


def _fp8_quantize(w: torch.Tensor):
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    scale = torch.zeros(br, bc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _is_fp8_target(name: str, t: torch.Tensor) -> bool:
    return (t.dim() == 2 and name.endswith(".weight") and "layers." in name
            and "norm" not in name and ".mlp.gate." not in name)


def test_official_fp8_sharded_checkpoint_matches_dequantized_reference(tmp_path):
    ref = save_reference(tmp_path / "src", seed=5, **FP8_DIMS)
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    fp8, dequant = {}, {}
    for name, t in tensors.items():
        if _is_fp8_target(name, t):
            q, s = _fp8_quantize(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequant[name] = q.float() * s.repeat_interleave(FP8_BLOCK, 0)[:t.shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, :t.shape[1]]
        else:
            fp8[name] = t
            dequant[name] = t
    assert any(v.dtype == torch.float8_e4m3fn for v in fp8.values())
    # Two shards with an index, plus an MTP layer (index == num_hidden_layers) that must be ignored.
    out = tmp_path / "fp8"
    out.mkdir()
    fp8["model.layers.3.embed_tokens.weight"] = torch.zeros(2, 2)
    names = sorted(fp8)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: fp8[k].contiguous() for k in keys}, out / file)
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # Official spelling of the config: rope_scaling + top-level rope_theta, no rope_interleave.
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.pop("rope_interleave")
    cfg["rope_theta"] = 10000.0
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))

    # The reference: transformers loading the dequantized weights (same yarn settings, its own spelling).
    deq = tmp_path / "dequantized"
    deq.mkdir()
    save_file({k: v.contiguous() for k, v in dequant.items()}, deq / "model.safetensors", metadata={"format": "pt"})
    ref_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    ref_cfg["rope_parameters"] = {**cfg["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    ref_cfg["rope_parameters"].pop("type")
    (deq / "config.json").write_text(json.dumps(ref_cfg))
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    model = sdk.load_model(out)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


def _broken_copy(tiny_checkpoint, tmp_path, edit):
    src, _ = tiny_checkpoint
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle|pickle.*pytorch_model\.bin"):
        sdk.load_model(tmp_path)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"

    def drop(d):
        t = load_file(d / "model.safetensors")
        del t[name]
        save_file(t, d / "model.safetensors")

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        sdk.load_model(_broken_copy(tiny_checkpoint, tmp_path, drop))


def test_misshapen_tensor_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj.weight"

    def reshape(d):
        t = load_file(d / "model.safetensors")
        t[name] = torch.zeros(5, 7)
        save_file(t, d / "model.safetensors")

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + r".*\(5, 7\)"):
        sdk.load_model(_broken_copy(tiny_checkpoint, tmp_path, reshape))


def test_truncated_safetensors_is_named(tiny_checkpoint, tmp_path):
    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        sdk.load_model(_broken_copy(tiny_checkpoint, tmp_path, truncate))


def test_unknown_model_type_is_named(tiny_checkpoint, tmp_path):
    def retype(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match=r"config\.json.*model_type 'llama'"):
        sdk.load_model(_broken_copy(tiny_checkpoint, tmp_path, retype))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sdk.load_model(tmp_path / "nowhere")


def test_inspect_json_reports_the_contract_keys(tiny_checkpoint, capsys):
    from sdk.cli import main

    path, ref = tiny_checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bias = sum(b.numel() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))
    assert report["params_total"] == sum(p.numel() for p in ref.parameters()) + bias
    assert report["experts_per_layer"] == [8, 8]
    assert report["quant"] == "f32" and report["io"] is None
    assert report["size_bytes"] >= (path / "model.safetensors").stat().st_size
    assert report["params_active"] < report["params_total"]


def test_cli_help_and_clean_errors(tmp_path):
    import subprocess
    import sys

    exe = [sys.executable, "-m", "sdk.cli"]
    assert "inspect" in subprocess.run(exe + ["--help"], capture_output=True, text=True, check=True).stdout
    done = subprocess.run(exe + ["inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2 and "missing" in done.stderr and "Traceback" not in done.stderr
