"""Package format: write, verify every hash, refuse tampered, truncated, missing or extra files."""
from __future__ import annotations

import json
import os

import pytest
import torch

import sdk
from runtime.model.config import ModelConfig
from runtime.model.transformer import Transformer
from sdk.tools.package import (FORMAT, FORMAT_VERSION, PackageError, PackageWriter, is_package, load_package,
                         read_manifest, sha256_file, verify_package, write_package)

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
           num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
           n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=8,
           q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
           max_position_embeddings=64)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CFG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.uniform_(0.8, 1.2)
    return model


def _manifest(model: Transformer) -> dict:
    cfg = model.config
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "quantization": {"scheme": "none"},
            "experts": {"kept": {str(i): list(range(cfg.n_routed_experts))
                                 for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)},
                        "original_n_routed_experts": cfg.n_routed_experts, "method": None},
            "io": None, "calibration": None, "quality": None, "created_by": "r1edge test"}


@pytest.fixture
def sharded(tmp_path):
    """A float package in three files (head, two layer shards) and the model it came from."""
    model = _model()
    sd = model.state_dict()
    out = tmp_path / "pkg"
    with PackageWriter(out) as w:
        w.add("model-head.safetensors", {k: v for k, v in sd.items() if not k.startswith("model.layers.")})
        w.add("model-layer-000.safetensors", {k: v for k, v in sd.items() if k.startswith("model.layers.0.")})
        w.add("model-layers-rest.safetensors",
              {k: v for k, v in sd.items() if k.startswith("model.layers.") and not k.startswith("model.layers.0.")})
        w.finish(_manifest(model))
    return out, model


def test_round_trip_is_bitwise_and_hashes_are_real(sharded):
    out, model = sharded
    assert is_package(out) and not is_package(out.parent)
    manifest = verify_package(out)
    assert set(manifest["files"]) == {"model-head.safetensors", "model-layer-000.safetensors",
                                      "model-layers-rest.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name)   # hashes of the bytes on disk
        assert entry["bytes"] == (out / name).stat().st_size
    # Nothing but the package is left next to it (the temporary directory was renamed).
    assert sorted(p.name for p in out.parent.iterdir()) == ["pkg"]
    ids = torch.randint(0, 61, (2, 7))
    loaded = sdk.load_model(out)
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "append"])
def test_every_weight_file_is_checked(sharded, damage):
    out, _ = sharded
    for name in read_manifest(out)["files"]:
        file = out / name
        original = file.read_bytes()
        if damage == "flip":        # one byte in the middle of the tensor data
            data = bytearray(original)
            data[len(data) * 2 // 3] ^= 0x01
            file.write_bytes(bytes(data))
            expect = "sha256 does not match"
        elif damage == "truncate":
            file.write_bytes(original[:-1])
            expect = "truncated"
        elif damage == "delete":
            file.unlink()
            expect = "missing"
        else:
            file.write_bytes(original + b"\0")
            expect = "bytes, manifest.json says"
        with pytest.raises(PackageError, match=expect) as err:
            sdk.load_model(out)
        assert str(file) in str(err.value)
        file.write_bytes(original)
    verify_package(out)


def test_extra_files_and_bad_manifests_are_refused(sharded):
    out, _ = sharded
    stray = out / "model-layer-999.safetensors"
    stray.write_bytes(b"x")
    with pytest.raises(PackageError, match="not listed in manifest.json") as err:
        verify_package(out)
    assert str(stray) in str(err.value)
    stray.unlink()

    mpath = out / "manifest.json"
    good = json.loads(mpath.read_text())
    cases = [
        ({**good, "format_version": 99}, "format_version"),
        ({**good, "format": "zip"}, "'format'"),
        ({k: v for k, v in good.items() if k != "files"}, "missing key 'files'"),
        ({**good, "quantization": {"scheme": "int4"}}, "quantization.scheme"),
        ({**good, "files": {"../evil.safetensors": next(iter(good["files"].values()))}}, "plain file name"),
        ({**good, "files": {"sub/x.safetensors": next(iter(good["files"].values()))}}, "plain file name"),
        ({**good, "files": {"model.bin": next(iter(good["files"].values()))}}, "not a .safetensors"),
        ({**good, "config": {**good["config"], "n_group": 3}}, "n_group"),
    ]
    for bad, expect in cases:
        mpath.write_text(json.dumps(bad))
        with pytest.raises(PackageError, match=expect):
            sdk.load_model(out)
    mpath.write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        verify_package(out)
    mpath.unlink()
    with pytest.raises(PackageError, match="manifest.json: missing"):
        load_package(out)


def test_tensor_mismatches_name_the_tensor_and_file(tmp_path):
    model = _model()
    sd = model.state_dict()
    name = "model.layers.1.mlp.gate.weight"
    bad = dict(sd)
    bad[name] = sd[name][:3]
    write_package(tmp_path / "shape", _manifest(model), bad)
    with pytest.raises(PackageError, match=f"{name}.*shape") as err:
        sdk.load_model(tmp_path / "shape")
    assert "model.safetensors" in str(err.value)
    short = {k: v for k, v in sd.items() if k != name}
    write_package(tmp_path / "short", _manifest(model), short)
    with pytest.raises(PackageError, match=f"{name}.*missing"):
        sdk.load_model(tmp_path / "short")


def test_failed_write_leaves_nothing_and_existing_output_is_kept(tmp_path):
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with PackageWriter(tmp_path / "pkg") as w:
            w.add("model.safetensors", model.state_dict())
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        write_package(tmp_path / "taken", _manifest(model), model.state_dict())
    with pytest.raises(FileExistsError, match="not an r1edge package"):
        write_package(tmp_path / "taken", _manifest(model), model.state_dict(), overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    # A package may be replaced by a new one.
    write_package(tmp_path / "pkg", _manifest(model), model.state_dict())
    write_package(tmp_path / "pkg", _manifest(model), _model(seed=1).state_dict(), overwrite=True)
    assert torch.equal(sdk.load_model(tmp_path / "pkg").lm_head.weight, _model(seed=1).lm_head.weight)
