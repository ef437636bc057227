"""Deployment config: parsing, defaults, path resolution and errors that name file and field."""
from __future__ import annotations

import math
import re

import pytest

from sdk.service.config import ConfigError, DeployConfig

BASE = """
[model]
path = "model"
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

FULL = """
[model]
path = "pkg/model"
device = "cuda:1"
window = 16
streams = 64
[loop]
period_ms = 1
deadline_ms = 0.8
infer_budget_ms = 0.5
realtime = true
spin_us = 150
priority = 70
cpu = 1
threads = 2
[[inputs]]
name = "level"
min = 0.0
max = 2.0
stale_ms = 20
on_invalid = "hold"
[[inputs]]
name = "flow"
min = -1
max = 1
[[outputs]]
name = "valve"
min = 0.0
max = 1.0
max_rate = 0.5
failsafe = 0.0
[recorder]
path = "/var/r1edge/rec"
max_bytes = 1048576
keep = 4
"""


def write(tmp_path, text, name="deploy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults(tmp_path):
    cfg = DeployConfig.load(write(tmp_path, BASE))
    assert cfg.model.path == (tmp_path / "model").resolve()
    assert (cfg.model.device, cfg.model.window, cfg.model.streams) == ("cpu", 32, 1)
    assert cfg.loop.period_ms == 10.0 and cfg.loop.deadline_ms == 10.0          # deadline = period
    assert cfg.loop.infer_budget_ms == pytest.approx(8.0) and cfg.loop.realtime is False
    assert cfg.loop.period_ns == 10_000_000 and cfg.loop.threads == 1
    (inp,) = cfg.inputs
    assert (inp.stale_ms, inp.on_invalid) == (200.0, "failsafe")
    (out,) = cfg.outputs
    assert out.max_rate is None and out.limit().max_rate == math.inf
    assert cfg.recorder is None and cfg.modbus is None and cfg.zmq is None


def test_every_field(tmp_path):
    cfg = DeployConfig.load(write(tmp_path, FULL))
    assert cfg.model.path == tmp_path / "pkg" / "model"
    assert (cfg.model.device, cfg.model.window, cfg.model.streams) == ("cuda:1", 16, 64)
    lp = cfg.loop
    assert (lp.period_ms, lp.deadline_ms, lp.infer_budget_ms, lp.realtime, lp.spin_us, lp.priority, lp.cpu,
            lp.threads) == (1.0, 0.8, 0.5, True, 150.0, 70, 1, 2)
    assert [i.name for i in cfg.inputs] == ["level", "flow"]
    lim = cfg.inputs[0].limit()
    assert (lim.min, lim.max, lim.stale_ns, lim.hold) == (0.0, 2.0, 20_000_000, True)
    assert cfg.inputs[1].stale_ms == 200.0
    assert cfg.outputs[0].limit().max_rate == 0.5
    assert str(cfg.recorder.path) == "/var/r1edge/rec"
    assert (cfg.recorder.max_bytes, cfg.recorder.keep, cfg.recorder.enabled) == (1 << 20, 4, True)
    d = cfg.to_dict()
    assert d["model"]["path"] == str(tmp_path / "pkg" / "model") and d["loop"]["period_ms"] == 1.0


def test_stale_default_follows_a_long_period(tmp_path):
    cfg = DeployConfig.load(write(tmp_path, BASE.replace("[[inputs]]", "[loop]\nperiod_ms = 100\n[[inputs]]", 1)))
    assert cfg.inputs[0].stale_ms == 300.0


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("max = 1.0\nfailsafe", "max = -1.0\nfailsafe"),
     "deploy.toml: outputs[0] 'valve': min (0.0) must be below max (-1.0)"),
    (lambda t: t + '[[outputs]]\nname = "pump"\nmin = 2.0\nmax = 1.0\nfailsafe = 1.5\n',
     "deploy.toml: outputs[1] 'pump': min (2.0) must be below max (1.0)"),
    (lambda t: t.replace("failsafe = 0.0", "failsafe = 3.0"),
     "deploy.toml: outputs[0] 'valve': failsafe (3.0) must lie within [min, max] = [0.0, 1.0]"),
    (lambda t: t.replace("failsafe = 0.0", "failsafe = 0.0\nmax_rate = -2"),
     "deploy.toml: outputs[0] 'valve': max_rate must be positive, got -2.0"),
    (lambda t: t.replace("failsafe = 0.0", "failsafe = 0.0\ncolour = 'red'"),
     "deploy.toml: outputs[0] 'valve': unknown key 'colour'"),
    (lambda t: t.replace('path = "model"', 'path = "model"\nwindows = 3'),
     "deploy.toml: model: unknown key 'windows'"),
    (lambda t: t + "[extra]\na = 1\n", "deploy.toml: unknown key 'extra'"),
    (lambda t: t.replace('path = "model"', ""), "deploy.toml: model.path is required"),
    (lambda t: t.replace('path = "model"', 'path = "model"\nwindow = "32"'),
     "deploy.toml: model.window must be an integer, got '32'"),
    (lambda t: t.replace('path = "model"', 'path = "model"\nwindow = 0'),
     "deploy.toml: model.window must be at least 1, got 0"),
    (lambda t: t.replace('path = "model"', 'path = "model"\ndevice = "tpu"'),
     "deploy.toml: model.device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (lambda t: t + "[loop]\nperiod_ms = 5\ndeadline_ms = 6\n",
     "deploy.toml: loop.deadline_ms must not exceed period_ms (5.0), got 6.0"),
    (lambda t: t + "[loop]\nperiod_ms = 0\n", "deploy.toml: loop.period_ms must be positive, got 0.0"),
    (lambda t: t + "[loop]\nrealtime = 1\n", "deploy.toml: loop.realtime must be true or false, got 1"),
    (lambda t: t + "[loop]\npriority = 100\n", "deploy.toml: loop.priority must be at most 99, got 100"),
    (lambda t: t.replace("max = 2.0", "max = true"), "deploy.toml: inputs[0] 'level': max must be a number, got True"),
    (lambda t: t.replace("max = 2.0", "max = inf"), "deploy.toml: inputs[0] 'level': max must be finite, got inf"),
    (lambda t: t.replace("max = 2.0", 'max = 2.0\non_invalid = "ignore"'),
     "deploy.toml: inputs[0] 'level': on_invalid must be one of 'failsafe', 'hold', got 'ignore'"),
    (lambda t: t.replace('name = "valve"', 'name = "level"'),
     "deploy.toml: outputs[0].name 'level' is already used by inputs[0]"),
    (lambda t: t.replace('name = "valve"', 'name = "_heartbeat"'),
     "deploy.toml: outputs[0].name '_heartbeat' must start with a letter"),
    (lambda t: t.replace("[[outputs]]", "[outputs]"), "deploy.toml: outputs must be an array of tables"),
    (lambda t: t.split("[[outputs]]")[0], "deploy.toml: at least one [[outputs]] entry is required"),
    (lambda t: t + "[recorder]\nkeep = 2\n", "deploy.toml: recorder.path is required"),
    (lambda t: t + "[recorder]\npath = 'r'\nmax_bytes = 10\n",
     "deploy.toml: recorder.max_bytes must be at least 4096, got 10"),
    (lambda t: t + "[zmq]\nsensors = 5\n", "deploy.toml: zmq.sensors"),
    (lambda t: t + "[modbus]\nmode = 'bus'\n", "deploy.toml: modbus.mode"),
])
def test_errors_name_file_and_field(tmp_path, edit, message):
    path = write(tmp_path, edit(BASE))
    with pytest.raises(ConfigError) as err:
        DeployConfig.load(path)
    text = str(err.value)
    assert text.startswith(str(path)), text
    assert message.replace("deploy.toml", str(path)) in text, text


def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, BASE + "\n[loop\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": invalid TOML: .*line 14"):
        DeployConfig.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such deployment config"):
        DeployConfig.load(tmp_path / "nope.toml")


MODBUS = """
[modbus]
mode = "server"
host = "127.0.0.1"
port = 5020
device_id = 1
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
[[modbus.map]]
signal = "_heartbeat"
table = "holding"
address = 4
type = "uint16"
"""


def test_modbus_and_zmq_tables_are_validated_and_kept(tmp_path):
    (tmp_path / "keys").mkdir()
    from plc_bridge.zmq_bridge import make_keys
    _, secret = make_keys(tmp_path / "keys", "server")
    zmq = f"""
[zmq]
sensors = "tcp://127.0.0.1:5556"
decisions = "tcp://127.0.0.1:5557"
control = "tcp://127.0.0.1:5558"
curve = {{ secret_key = "keys/{secret.name}" }}
"""
    cfg = DeployConfig.load(write(tmp_path, BASE + MODBUS + zmq))
    assert cfg.modbus["port"] == 5020 and [m["signal"] for m in cfg.modbus["map"]] == ["level", "valve", "_heartbeat"]
    assert cfg.zmq["curve"]["secret_key"] == str(secret.resolve())
    assert cfg.zmq["sensors"] == "tcp://127.0.0.1:5556"


def test_modbus_stream_is_kept_and_checked(tmp_path):
    cfg = DeployConfig.load(write(tmp_path, BASE + MODBUS.replace("port = 5020", 'port = 5020\nstream = "line1"')))
    assert cfg.modbus["stream"] == "line1"
    path = write(tmp_path, BASE + MODBUS.replace("port = 5020", 'port = 5020\nstream = ""'))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": modbus\.stream: '' is not a stream name"):
        DeployConfig.load(path)


def test_modbus_map_errors_name_the_file(tmp_path):
    bad = MODBUS.replace('signal = "valve"', 'signal = "valv"')
    path = write(tmp_path, BASE + bad)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": modbus\.map\[1\].*'valv'"):
        DeployConfig.load(path)
