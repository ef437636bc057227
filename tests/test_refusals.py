"""Clean refusals of hostile files: deployment configs give ConfigError naming the key and the
reason (numbers bounded to what the loop can honour); see docs/faults/refusals.md."""
from __future__ import annotations

import pytest

from sdk.service.config import ConfigError, DeployConfig

BASE = """
[model]
path = "model"
[loop]
period_ms = 10
[[inputs]]
name = "level"
min = 0.0
max = 2.0
[[outputs]]
name = "valve"
min = 0.0
max = 1.0
failsafe = 0.0
"""

MODBUS = """
[modbus]
mode = "server"
port = 0
heartbeat = { address = 100, timeout_ms = 500 }
[[modbus.map]]
signal = "level"
table = "holding"
address = 0
type = "float32"
[[modbus.map]]
signal = "valve"
table = "holding"
address = 2
type = "float32"
"""

OPCUA = """
[opcua]
endpoint = "opc.tcp://127.0.0.1:4840/r1edge"
security = ["None"]
"""


@pytest.mark.parametrize("edit, message", [
    # a table (or a number) where a table's values are expected: AttributeError before
    (lambda t: "loop = 5\n" + t.replace("[loop]\nperiod_ms = 10", ""), "loop: must be a table, got int"),
    (lambda t: "outputs = [3]\n" + t.split("[[outputs]]")[0], "outputs[0]: must be a table, got int"),
    # unhashable values where a name is expected: TypeError in the bridges' parsers before
    (lambda t: t + MODBUS.replace('type = "float32"', 'type = ["float32"]', 1),
     "modbus.map[0] (signal 'level'): type = ['float32'] is not one of"),
    (lambda t: t + OPCUA + "streams = [{ a = 1 }]\n", "opcua.streams: [{'a': 1}] must be a list of distinct"),
    # numbers past what the loop can honour, with the bound in the message
    (lambda t: t + MODBUS.replace("timeout_ms = 500", "timeout_ms = 1e308"),
     "modbus.heartbeat: timeout_ms = 1e+308 must be > 0 and at most 86400000 (a day)"),
    (lambda t: t + MODBUS.replace("port = 0", "port = 0\nrequest_timeout_ms = 1e9"),
     "modbus.request_timeout_ms: 1000000000.0 is not a positive number of milliseconds (at most a day, 86400000)"),
    (lambda t: t.replace("max = 2.0", "max = 2.0\nstale_ms = 5e-324"),
     "inputs[0] 'level': stale_ms must be at least the loop period (10 ms)"),
    (lambda t: t.replace("max = 2.0", "max = 2.0\nstale_ms = 5"),
     "inputs[0] 'level': stale_ms must be at least the loop period (10 ms)"),
    (lambda t: t.replace("max = 2.0", "max = 2.0\nstale_ms = 1e308"),
     "inputs[0] 'level': stale_ms must be at most 86400000 (a day), got 1e+308"),
    (lambda t: t.replace("period_ms = 10", "period_ms = 10\nspin_us = 1e308"),
     "loop.spin_us must be below the period (10000 us)"),
    (lambda t: t.replace("period_ms = 10", "period_ms = 5e-324"),
     "loop.period_ms must be at least 0.1 (the shortest period the loop can honour)"),
    (lambda t: t.replace("period_ms = 10", "period_ms = 1e308"), "loop.period_ms must be at most 86400000 (a day)"),
    (lambda t: t.replace("period_ms = 10", "period_ms = 10\ndeadline_ms = 5e-324"),
     "loop.deadline_ms must be at least 0.01 (the loop's clock resolution)"),
    (lambda t: t.replace('path = "model"', 'path = "model"\nparallel = { world_size = 2, timeout_s = 1e9 }'),
     "model.parallel.timeout_s must be at most 86400 (a day)"),
    # integers are not addresses
    (lambda t: t + MODBUS.replace("port = 0", "port = 0\nallow = [167772165]"),
     "modbus.allow[0]: 167772165 is not an address or network (a string"),
])
def test_malformed_deploy_files_give_config_error(tmp_path, edit, message):
    path = tmp_path / "deploy.toml"
    path.write_text(edit(BASE))
    with pytest.raises(ConfigError) as err:
        DeployConfig.load(path)
    assert type(err.value) is ConfigError
    assert f"{path}: " in str(err.value) and message in str(err.value), str(err.value)


def test_the_bounds_themselves_are_accepted(tmp_path):
    """A stale limit of exactly one period, a heartbeat of a day and a 0.1 ms loop still load."""
    path = tmp_path / "deploy.toml"
    path.write_text(BASE.replace("max = 2.0", "max = 2.0\nstale_ms = 10")
                    + MODBUS.replace("timeout_ms = 500", "timeout_ms = 86400000"))
    cfg = DeployConfig.load(path)
    assert cfg.inputs[0].stale_ms == 10.0 and cfg.loop.spin_us == 200.0
    path.write_text(BASE.replace("period_ms = 10", "period_ms = 0.1"))
    cfg = DeployConfig.load(path)
    assert cfg.loop.period_ns == 100_000 and cfg.loop.spin_us == 50.0       # default spin: half a short period


# ---------------------------------------------------------------- packages and checkpoints
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

import sdk
from runtime.model.weights import CheckpointError, CheckpointReader
from sdk.tools.package import PackageError, sha256_file

DEMO = Path(sdk.__file__).resolve().parent / "demo" / "model"


def _blob(header, data=b"", length=None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
HOSTILE = {
    "length-2**64-1": _blob(GOOD, b"\0" * 8, length=2**64 - 1),
    "length-past-file": _blob(GOOD, b"\0" * 8, length=10_000),
    "shorter-than-8-bytes": b"\x05\0\0",
    "header-a-list": _blob([]),
    "header-not-json": _blob(b"\xff\xfe{"),
    "header-nested-deep": _blob(b"[" * 100_000),
    "entry-not-a-table": _blob({"t": 5}),
    "unknown-dtype": _blob({"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "shape-of-strings": _blob({"t": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative-dim": _blob({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets-past-file": _blob({"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8),
    "offsets-reversed": _blob({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
    "span-not-shape": _blob({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16),
    "overlapping": _blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "metadata-not-strings": _blob({**GOOD, "__metadata__": {"k": [1]}}, b"\0" * 8),
}


def _package_with(tmp_path: Path, file: str, blob: bytes, src: Path = DEMO) -> Path:
    """The demo package with ``file`` replaced by ``blob`` and the manifest's hash updated
    (what someone who can write the package can do)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(src, pkg)
    (pkg / file).write_bytes(blob)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][file] = {"sha256": sha256_file(pkg / file), "bytes": len(blob)}
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return pkg


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_safetensors_headers_give_package_error(tmp_path, name, mmap):
    pkg = _package_with(tmp_path, "model-head.safetensors", HOSTILE[name])
    with pytest.raises(PackageError, match="model-head.safetensors"):
        sdk.load_model(pkg, mmap=mmap)


def test_tokenizer_files_are_not_read_as_weights(tmp_path):
    pkg = _package_with(tmp_path, "tokenizer.json", json.dumps({"version": "1.0", "model": {}}).encode())
    for mmap in (False, True):
        model = sdk.load_model(pkg, mmap=mmap)
        assert model(torch.zeros(1, 1, dtype=torch.long)).shape[:2] == (1, 1)


def _checkpoint(tmp_path: Path, weight_map: dict) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    manifest = json.loads((DEMO / "manifest.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(manifest["config"]))
    save_file({"a": torch.zeros(2)}, str(ckpt / "w.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ckpt


@pytest.mark.parametrize("target", ["../outside.safetensors", "{outside}", "/dev/zero", "sub/w.safetensors"])
def test_checkpoint_index_paths_stay_inside(tmp_path, target):
    """An index naming a file outside the checkpoint is refused, naming the entry, before any
    weight file is opened (the outside file is a valid safetensors file the old code read)."""
    save_file({"b": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    target = target.format(outside=tmp_path / "outside.safetensors")
    ckpt = _checkpoint(tmp_path, {"a": "w.safetensors", "model.embed_tokens.weight": target})
    with pytest.raises(CheckpointError, match=r"weight_map\['model.embed_tokens.weight'\].*not a plain"):
        CheckpointReader(ckpt)
    with pytest.raises(CheckpointError, match=r"weight_map\['model.embed_tokens.weight'\]"):
        sdk.load_model(ckpt)


# ---------------------------------------------------------------- chat and prompt templates
import threading

from sdk.cli import main
from sdk.service.advisor import PromptTemplate
from sdk.tools.templates import TemplateRenderError
from sdk.tools.text import load_tokenizer

LM = Path(__file__).resolve().parents[1] / "examples" / "advisor" / "model"
NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE = "{{ 'a' * 10**10 }}"


def _with_chat_template(tmp_path: Path, template: str) -> Path:
    config = json.loads((LM / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    return _package_with(tmp_path, "tokenizer_config.json", json.dumps(config).encode(), src=LM)


def _in_thread(fn):
    """Run ``fn`` in a thread and return what it raised; a render that never ends (the old
    behaviour) fails the test after five generous minutes instead of hanging the suite."""
    box = []

    def run():
        try:
            fn()
        except BaseException as exc:                      # noqa: BLE001 (reported below)
            box.append(exc)
        else:
            box.append(None)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(300)
    assert box, "the render did not end"
    return box[0]


@pytest.mark.parametrize("template, reason", [(NESTED, "ran past its 1 s budget"),
                                              (HUGE, "str * 10000000000 would hold")])
def test_chat_templates_render_under_a_budget(tmp_path, template, reason):
    tok = load_tokenizer(_with_chat_template(tmp_path, template))
    exc = _in_thread(lambda: tok.render_chat([{"role": "user", "content": "hi"}]))
    assert isinstance(exc, TemplateRenderError) and isinstance(exc, ValueError), repr(exc)
    assert "tokenizer_config.json: chat_template" in str(exc) and reason in str(exc), str(exc)


@pytest.mark.parametrize("template, reason", [(NESTED, "ran past its 1 s budget"),
                                              (HUGE, "str * 10000000000 would hold")])
def test_advisor_prompts_render_under_a_budget(template, reason):
    prompt = PromptTemplate(template, "prompts/advice.j2")
    exc = _in_thread(lambda: prompt.render({}))
    assert isinstance(exc, TemplateRenderError), repr(exc)
    assert str(exc).startswith("prompts/advice.j2: ") and reason in str(exc), str(exc)


def test_generate_chat_with_a_runaway_template_exits_2(tmp_path, capsys):
    pkg = _with_chat_template(tmp_path, NESTED)
    box = []
    exc = _in_thread(lambda: box.append(main(["generate", str(pkg), "--prompt", "hi", "--chat",
                                              "--max-new-tokens", "4"])))
    assert exc is None and box == [2]
    err = capsys.readouterr().err
    assert "chat_template" in err and "budget" in err, err


@pytest.mark.parametrize("key, value, reason", [("num_hidden_layers", 10**6, "num_hidden_layers = 1000000 is past 256"),
                                                ("n_routed_experts", 10**7, "n_routed_experts = 10000000 is past")])
def test_a_manifest_config_too_large_to_lay_out_is_refused(tmp_path, key, value, reason):
    """A manifest (with matching hashes) describing a model of a million layers: refused before
    its modules are laid out (the old code spent hours building them on the meta device)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(DEMO, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["config"][key] = value
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    exc = _in_thread(lambda: sdk.load_model(pkg))
    assert isinstance(exc, PackageError) and reason in str(exc), repr(exc)
