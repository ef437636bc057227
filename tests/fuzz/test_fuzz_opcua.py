"""Fuzz target ``opcua``: random writes (node ids in any namespace, attributes, variant types
and values, arrays) through a real asyncua client session to the OPC UA bridge.

Promises checked on every input: Good only for a finite Double scalar within an input's range
written to that input's Value (``main.mode`` is refused too: this bridge has no controller's
mode handler); every other result is a refusal counted in ``health()["bad"]``;
the server keeps serving (a read after each input) and never counts an error of its own.
Kept inputs (``tests/fuzz/corpus/opcua/*.json``: lists of writes as :func:`decode` reads them)
are replayed first."""
from __future__ import annotations

import json
import math
import socket

import pytest
from asyncua import Client, ua
from asyncua.sync import ThreadLoop
from hypothesis import given
from hypothesis import strategies as st

from plc_bridge.opcua import STATS_NODES, OpcUaBridge, Signal
from tests.fuzz.budget import budget, corpus, tried

INPUTS = [Signal("level", 0.0, 2.0), Signal("temperature", -10.0, 120.0)]
OUTPUTS = [Signal("valve", 0.0, 1.0)]
RANGES = {f"main.inputs.{s.name}": (s.min, s.max) for s in INPUTS}
OURS = [*RANGES, "main.outputs.valve", "main.status", "main.mode", "heartbeat", "main.inputs.level.EURange", "r1edge",
        *(f"stats.{n}" for n in STATS_NODES)]
TEXT = st.characters(blacklist_categories=("Cs",))       # any text UTF-8 can carry
SCALARS = {
    "Double": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 0.0, 2.0, 2.0000000001, -10.0]),
    "Float": st.floats(width=32),
    "Int32": st.integers(-2**31, 2**31 - 1),
    "UInt16": st.integers(0, 65535),
    "Int64": st.integers(-2**63, 2**63 - 1),
    "Boolean": st.booleans(),
    "String": st.text(TEXT, max_size=40) | st.sampled_from(["manual", "auto"]),
    "ByteString": st.binary(max_size=40),
}


@st.composite
def writes(draw) -> list[dict]:
    """1 to 4 writes, each ``{"ns": "ours"|int, "id": str|int, "attr": int, "type": str, "value": ...}``."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        ns = draw(st.sampled_from(["ours", "ours", "ours", 0, 1, 7]))
        node = (draw(st.sampled_from(OURS) | st.text(TEXT, min_size=1, max_size=30)) if ns != 0
                else draw(st.sampled_from([2255, 2256, 2259, 2267, 11705, 85, 84]) | st.integers(0, 30000)))
        attr = draw(st.sampled_from([13] * 6 + [1, 3, 4, 5, 14, 15, 17, 20, 27, 99]))
        kind = draw(st.sampled_from([*SCALARS, "Double[]", "Null"]))
        if kind == "Double[]":
            value = draw(st.lists(SCALARS["Double"], max_size=4))
        elif kind == "Null":
            value = None
        else:
            value = draw(SCALARS[kind])
        out.append({"ns": ns, "id": node, "attr": attr, "type": kind, "value": value})
    return out


def decode(item: dict, ns_ours: int) -> ua.WriteValue:
    """A write of :func:`writes` (or of a kept corpus file) as asyncua's WriteValue."""
    ns = ns_ours if item["ns"] == "ours" else item["ns"]
    value = item["value"]
    if isinstance(value, str) and item["type"] in ("Double", "Float", "Double[]") and value in ("nan", "inf", "-inf"):
        value = float(value)
    if item["type"] == "Null":
        variant = ua.Variant()
    elif item["type"] == "Double[]":
        variant = ua.Variant([float(v) for v in value], ua.VariantType.Double, is_array=True)
    else:
        variant = ua.Variant(value, getattr(ua.VariantType, item["type"]))
    return ua.WriteValue(NodeId=ua.NodeId(item["id"], ns), AttributeId=item["attr"],
                         Value=ua.DataValue(variant))


def should_be_good(item: dict) -> bool:
    """The one kind of write the bridge accepts."""
    rng = RANGES.get(item["id"]) if item["ns"] == "ours" else None
    return (rng is not None and item["attr"] == ua.AttributeIds.Value and item["type"] == "Double"
            and isinstance(item["value"], float) and math.isfinite(item["value"]) and rng[0] <= item["value"] <= rng[1])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The bridge (security None, anonymous operators) and one client session on it, in a loop thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"opc.tcp://127.0.0.1:{port}/r1edge"
    bridge = OpcUaBridge.from_config({"endpoint": endpoint, "security": ["None"]}, tmp_path_factory.mktemp("fz"),
                                     INPUTS, OUTPUTS)
    loop = ThreadLoop()
    loop.start()
    with bridge:
        client = Client(endpoint, timeout=30)
        loop.post(client.connect())
        ns = loop.post(client.get_namespace_index("urn:r1edge"))
        try:
            yield {"bridge": bridge, "client": client, "loop": loop, "ns": ns}
        finally:
            loop.post(client.disconnect())
            loop.stop()


def check(session, items: list[dict]) -> None:
    """One input: its writes in one request, and the promises of the module docstring."""
    bridge, client, loop, ns = session["bridge"], session["client"], session["loop"], session["ns"]
    bad0 = sum(bridge.health()["bad"].values())
    codes = loop.post(client.uaclient.write(ua.WriteParameters(NodesToWrite=[decode(i, ns) for i in items])))
    assert len(codes) == len(items)
    for item, code in zip(items, codes):
        assert code.is_good() == should_be_good(item), (item, code)
    health = bridge.health()
    assert sum(health["bad"].values()) - bad0 == sum(not c.is_good() for c in codes), (items, codes, health["bad"])
    assert health["running"] and health["errors"] == {}, health
    beat = loop.post(client.get_node(ua.NodeId("heartbeat", ns)).read_value())    # still serving
    assert isinstance(beat, int)


@pytest.mark.parametrize("path", corpus("opcua"), ids=lambda p: p.name)
def test_kept_inputs(session, path):
    with tried("opcua"):
        check(session, json.loads(path.read_text()))


@budget()
@given(items=writes())
def test_fuzz_opcua_writes(session, items):
    with tried("opcua"):
        check(session, items)
