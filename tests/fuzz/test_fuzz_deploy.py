"""Fuzz target ``deploy``: mutated deployment files must load or raise ``ConfigError``, nothing else.

Seeds are valid deployments (plain, Modbus server and client, ZeroMQ with CURVE keys, OPC UA,
advisor, metrics); each input replaces, deletes or adds values anywhere in the parsed TOML
tree with values of every TOML type, including the hostile numbers (``1e308``, ``5e-324``,
``nan``, huge integers) and the wrong shapes (a table where a value is expected, a list where
a name is). Kept inputs are TOML files under ``tests/fuzz/corpus/deploy/``.
"""
from __future__ import annotations

import copy
import datetime
import math

import pytest
from hypothesis import given, strategies as st

from sdk.service.config import ConfigError, DeployConfig
from tests.fuzz.budget import budget, corpus, tree_paths, tried

try:
    import tomllib
except ModuleNotFoundError:                               # Python 3.10
    import tomli as tomllib

BASE = """
[model]
path = "model"
window = 8
[loop]
period_ms = 10
spin_us = 200
[[inputs]]
name = "level"
min = 0.0
max = 2.0
stale_ms = 100
[[inputs]]
name = "auto"
min = 0.0
max = 1.0
[[outputs]]
name = "valve"
min = 0.0
max = 1.0
max_rate = 0.5
failsafe = 0.0
track = "level"
[mode]
input = "auto"
[recorder]
path = "rec"
[metrics]
listen = "127.0.0.1:0"
"""

MODBUS = """
[modbus]
mode = "server"
host = "127.0.0.1"
port = 0
allow = ["127.0.0.1", "10.0.0.0/8"]
heartbeat = { address = 100, timeout_ms = 500 }
[[modbus.map]]
signal = "level"
table = "holding"
address = 0
type = "float32"
word_order = "big"
scale = 1.0
[[modbus.map]]
signal = "auto"
table = "coil"
address = 0
[[modbus.map]]
signal = "valve"
table = "holding"
address = 2
type = "float32"
"""

ZMQ = """
[zmq]
sensors = "tcp://127.0.0.1:5556"
decisions = "tcp://127.0.0.1:5557"
control = "tcp://127.0.0.1:5558"
curve = { secret_key = "keys/server.key_secret", allowed = "keys" }
"""

OPCUA = """
[opcua]
endpoint = "opc.tcp://127.0.0.1:4840/r1edge"
namespace = "urn:r1edge"
security = ["None"]
streams = ["main"]
stats_ms = 1000
"""

SEEDS = [BASE, BASE + MODBUS, BASE + MODBUS.replace('"server"', '"client"').replace("port = 0", "port = 5020").replace(
    'allow = ["127.0.0.1", "10.0.0.0/8"]\n', "").replace('table = "holding"\naddress = 0', 'table = "input"\naddress = 0')
    .replace('table = "coil"', 'table = "discrete"'), BASE + ZMQ, BASE + OPCUA]
SEED_TREES = [tomllib.loads(s) for s in SEEDS]

HOSTILE_FLOATS = [1e308, -1e308, 5e-324, -5e-324, math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-9, 86_400_001.0]
HOSTILE_INTS = [0, -1, 1, 2**63 - 1, -(2**63), 65535, 65536, 10**9]

scalars = st.one_of(
    st.booleans(),
    st.sampled_from(HOSTILE_INTS), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(HOSTILE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "main", "holding", "float32", "big", "server", "client",
                                           "level", "valve", "auto", "../x", "/dev/zero", "None", "a\x00b"]),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1)), st.dates(), st.times(),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


@st.composite
def deploy_trees(draw):
    """A seed deployment with one to four mutations anywhere in its tree."""
    tree = copy.deepcopy(draw(st.sampled_from(SEED_TREES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = tree_paths(tree)
        path = draw(st.sampled_from(paths))
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["stale_ms", "spin_us", "timeout_ms", "type", "streams", "allow",
                                         "period_ms", "deadline_ms", "public_key", "idle_timeout_s",
                                         "stream_idle_s", "x"]))] = draw(values)
        else:
            parent.append(draw(values))
    return tree


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A directory with the files the seeds name (CURVE keys)."""
    from plc_bridge.zmq_bridge import make_keys

    base = tmp_path_factory.mktemp("deploy")
    (base / "keys").mkdir()
    make_keys(base / "keys", "server")
    return base


def check(tree, base):
    """Load ``tree``: it must validate or raise ``ConfigError``."""
    try:
        DeployConfig.from_dict(tree, base_dir=base)
    except ConfigError:
        pass


@budget()
@given(tree=deploy_trees())
def test_fuzz_deploy(tree, base_dir):
    with tried("deploy"):
        check(tree, base_dir)


def test_seeds_are_valid(base_dir):
    for tree in SEED_TREES:
        DeployConfig.from_dict(copy.deepcopy(tree), base_dir=base_dir)


@pytest.mark.parametrize("path", corpus("deploy"), ids=lambda p: p.name)
def test_deploy_corpus(path, base_dir):
    """Every kept deployment that once escaped with another exception now gives ConfigError."""
    with pytest.raises(ConfigError) as err:
        DeployConfig.from_dict(tomllib.loads(path.read_text()), base_dir=base_dir)
    assert "deploy.toml:" in str(err.value)
