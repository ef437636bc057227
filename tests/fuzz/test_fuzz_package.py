"""Fuzz target ``package``: hostile safetensors headers, manifests and checkpoint indexes.

Every input must be read or refused with the package's ``PackageError`` or the checkpoint
reader's ``CheckpointError`` (both ``ValueError``s naming the file), never another exception,
a huge allocation or a file outside the directory. Headers go through both package read
paths (``iter_tensors``, ``mapped_tensors``) and the checkpoint reader; manifests through
``read_manifest`` and ``verify_package``; indexes through ``CheckpointReader``. Kept inputs
live under ``tests/fuzz/corpus/package/``: ``*.safetensors`` (a weight file),
``*.manifest.json`` and ``*.index.json``.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import save_file

from runtime.model.weights import CheckpointError, CheckpointReader
from sdk.tools.package import PackageError, iter_tensors, mapped_tensors, read_manifest, verify_package
from tests.fuzz.budget import budget, corpus, tree_paths, tried

DEMO = Path(__file__).resolve().parents[2] / "sdk" / "demo" / "model"
REFUSED = (PackageError, CheckpointError)
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X9", "", "F32\x00"]


def _int():
    return st.one_of(st.integers(-3, 64), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**64, -(2**63), 10**30]),
                     st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans())


@st.composite
def headers(draw):
    """Bytes of a safetensors file: a (mostly) well-formed header, mutated."""
    n_tensors = draw(st.integers(0, 3))
    header, offset = {}, 0
    for i in range(n_tensors):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(["F32", "I8", "U8"]))
        size = (4 if dtype == "F32" else 1) * (int(torch.tensor(shape).prod()) if shape else 1)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    for _ in range(draw(st.integers(0, 3))):
        tables = sorted(k for k, v in header.items() if isinstance(v, dict))
        if not tables:
            break
        entry = header[draw(st.sampled_from(tables))]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "whole"]))
        if key == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), _int()))
        elif key == "shape":
            entry["shape"] = draw(st.one_of(st.lists(_int(), max_size=4), _int()))
        elif key == "data_offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(_int(), max_size=3), _int()))
        elif key == "extra":
            entry[draw(st.text(max_size=4))] = draw(_int())
        else:
            header[draw(st.sampled_from(sorted(header)))] = draw(_int())
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3),
                                                                                             _int()), max_size=2),
                                                _int()))
    text = json.dumps(header).encode()
    style = draw(st.sampled_from(["ok", "ok", "ok", "length", "json", "raw", "short"]))
    if style == "json":                       # not JSON, or not an object, or nested deep
        text = draw(st.sampled_from([b"[", b"[]", b"1", b'"x"', b"\xff\xfe", b"[" * 100_000, b"{" * 3000]))
    n = len(text)
    if style == "length":
        n = draw(st.sampled_from([0, 1, n - 1, n + 1, 2**31, 2**63, 2**64 - 1, 100 << 20]))
    data = draw(st.binary(min_size=max(offset - 4, 0), max_size=offset + 8))
    if style == "raw":
        return draw(st.binary(max_size=64))
    blob = struct.pack("<Q", n) + text + data
    return blob[:draw(st.integers(0, 7))] if style == "short" else blob


def _manifest_for(folder: Path, name: str) -> dict:
    return {"files": {name: {"sha256": "0" * 64, "bytes": (folder / name).stat().st_size}}}


def check_header(blob: bytes, folder: Path) -> None:
    """``blob`` as a package's weight file and as a checkpoint's: read or refused cleanly."""
    (folder / "w.safetensors").write_bytes(blob)
    manifest = _manifest_for(folder, "w.safetensors")
    for read in (iter_tensors, mapped_tensors):
        try:
            for _ in read(folder, manifest):
                pass
        except PackageError:
            pass
    try:
        reader = CheckpointReader(folder)
        for name in reader.names():
            reader.get(name, dtype=None)
    except CheckpointError:
        pass


@pytest.fixture
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("pkg")


@budget()
@given(blob=headers())
def test_fuzz_safetensors_headers(blob, folder):
    with tried("package-header"):
        check_header(blob, folder)


MANIFEST = json.loads((DEMO / "manifest.json").read_text())
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
              st.text(max_size=8), st.sampled_from(["../x.safetensors", "/dev/zero", "tokenizer.json", "w8a8-int8",
                                                    "deepseek_v3", 10**12, -1, 0])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def manifests(draw):
    """The demo package's manifest with one to three values replaced, deleted or added."""
    tree = copy.deepcopy(MANIFEST)
    for _ in range(draw(st.integers(1, 3))):
        paths = tree_paths(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["../a.safetensors", "x", "num_hidden_layers", "hidden_size"]))] = \
                draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    return tree


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "model"
    shutil.copytree(DEMO, out)
    return out


def check_manifest(text: str, package: Path) -> None:
    """``text`` as the package's manifest: read and verified, or refused cleanly."""
    (package / "manifest.json").write_text(text)
    try:
        read_manifest(package)
        verify_package(package)
    except PackageError:
        pass


@budget()
@given(tree=manifests())
def test_fuzz_manifest(tree, package):
    with tried("package-manifest"):
        check_manifest(json.dumps(tree), package)


@st.composite
def indexes(draw):
    """A checkpoint index whose weight map names hostile files."""
    names = st.one_of(st.sampled_from(["w.safetensors", "../w.safetensors", "/dev/zero", "/etc/passwd",
                                       "sub/w.safetensors", ".hidden.safetensors", "w.safetensors\x00",
                                       "..\\w.safetensors", "missing.safetensors", ""]), JSON_VALUES)
    weight_map = draw(st.one_of(st.dictionaries(st.text(max_size=4), names, max_size=3), JSON_VALUES))
    return json.dumps(draw(st.sampled_from([{"weight_map": weight_map}, weight_map, {"metadata": {}}])))


def check_index(text: str, folder: Path) -> None:
    """``text`` as ``model.safetensors.index.json`` next to one good weight file."""
    save_file({"a": torch.zeros(2)}, str(folder / "w.safetensors"))
    (folder / "model.safetensors.index.json").write_text(text)
    try:
        CheckpointReader(folder)
    except CheckpointError:
        pass


@budget()
@given(text=indexes())
def test_fuzz_checkpoint_index(text, folder):
    with tried("package-index"):
        check_index(text, folder)


@pytest.mark.parametrize("path", corpus("package"), ids=lambda p: p.name)
def test_package_corpus(path, folder, package):
    """Every kept input that once escaped is now refused with the package's or checkpoint's error."""
    if path.name.endswith(".manifest.json"):
        (package / "manifest.json").write_text(path.read_text())
        with pytest.raises(PackageError):
            verify_package(package)
    elif path.name.endswith(".index.json"):
        save_file({"a": torch.zeros(2)}, str(folder / "w.safetensors"))
        (folder / "model.safetensors.index.json").write_text(path.read_text())
        with pytest.raises(CheckpointError):
            CheckpointReader(folder)
    else:
        (folder / "w.safetensors").write_bytes(path.read_bytes())
        for read in (iter_tensors, mapped_tensors):
            with pytest.raises(PackageError):
                list(read(folder, _manifest_for(folder, "w.safetensors")))
        with pytest.raises(CheckpointError):
            CheckpointReader(folder)
