"""Signed packages: r1edge keys --signing / sign / verify / inspect, load_model(public_key=...),
[model] public_key in the Controller and r1edge run (exit 2), against signed, unsigned,
tampered-file, tampered-manifest and wrongly-signed packages."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import sdk
from sdk.cli import main
from sdk.service.config import ConfigError, DeployConfig
from sdk.tools.package import PackageError, sha256_file
from sdk.tools.signing import fingerprint, load_public_key, sign_package, verify_signed_package

DEMO = Path(sdk.__file__).resolve().parent / "demo"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs made by the CLI: ``plant`` (trusted) and ``other``."""
    out = tmp_path_factory.mktemp("keys")
    assert main(["keys", str(out), "--signing", "--name", "plant"]) == 0
    assert main(["keys", str(out), "--signing", "--name", "other"]) == 0
    assert (out / "plant.pem").stat().st_mode & 0o077 == 0              # the private key is private
    return out


@pytest.fixture
def signed(tmp_path, keys):
    pkg = tmp_path / "model"
    shutil.copytree(DEMO / "model", pkg)
    assert main(["sign", str(pkg), "--key", str(keys / "plant.pem"), "--identity", "Plant ML <ml@example.com>"]) == 0
    return pkg


def tamper_file(pkg: Path) -> None:
    """Flip one byte of a weight file's data (the manifest still has the old sha256)."""
    f = pkg / "model-head.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


def tamper_manifest(pkg: Path) -> None:
    """Flip a weight file's byte and rewrite its manifest entry to match: the package verifies
    on its own, only the signature shows it is not what was signed."""
    tamper_file(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["model-head.safetensors"]["sha256"] = sha256_file(pkg / "model-head.safetensors")
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=2))


CASES = {
    "unsigned": (lambda pkg: (pkg / "signature.json").unlink(), r"unsigned \(signature.json is missing\)"),
    "tampered-file": (tamper_file, r"model-head.safetensors: sha256 does not match manifest.json"),
    "tampered-manifest": (tamper_manifest, r"manifest.json changed after signing"),
    "tampered-signature": (lambda pkg: (pkg / "signature.json").write_text(
        (pkg / "signature.json").read_text().replace("Plant ML", "Someone else")), r"does not verify"),
}


def test_signed_package_verifies_loads_and_shows_its_signer(signed, keys, capsys):
    pub = keys / "plant.pub"
    record = verify_signed_package(signed, [pub])
    assert record["fingerprint"] == fingerprint(load_public_key(pub)) and record["identity"] == "Plant ML <ml@example.com>"
    model = sdk.load_model(signed, public_key=pub)
    assert model.adapter is not None
    sdk.load_model(signed, public_key=[keys / "other.pub", pub], mmap=True)      # any one trusted key will do
    capsys.readouterr()
    assert main(["verify", str(signed), "--key", str(pub)]) == 0
    assert "valid, signed by " + record["fingerprint"] in capsys.readouterr().out
    assert main(["inspect", str(signed), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["signed_by"] == {"fingerprint": record["fingerprint"], "identity": "Plant ML <ml@example.com>",
                                      "intact": True}
    assert main(["inspect", str(signed)]) == 0
    assert re.search(r"signed by\s+" + re.escape(record["fingerprint"]) + r" \(Plant ML", capsys.readouterr().out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_changed_or_unsigned_packages_are_refused(signed, keys, case, capsys):
    change, reason = CASES[case]
    change(signed)
    pub = keys / "plant.pub"
    for mmap in (False, True):
        with pytest.raises(PackageError, match=re.escape(str(signed)) + ".*" + reason):
            sdk.load_model(signed, public_key=pub, mmap=mmap)
    capsys.readouterr()
    assert main(["verify", str(signed), "--key", str(pub)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INVALID: ") and re.search(reason, out), out
    if case == "tampered-manifest":
        assert json.loads(json.dumps(sdk.tools.loading.describe(signed)["signed_by"]))["intact"] is False


def test_a_package_signed_by_another_key_is_refused(signed, keys, capsys):
    with pytest.raises(PackageError, match=r"signed by sha256:[0-9a-f]{64} \(Plant ML <ml@example.com>\), which "
                                           r"is not a trusted key"):
        sdk.load_model(signed, public_key=keys / "other.pub")
    assert main(["verify", str(signed), "--key", str(keys / "other.pub")]) == 1


def test_checkpoints_are_refused_when_a_signature_is_required(tmp_path, keys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(PackageError, match="a signed package is required .* this is a checkpoint"):
        sdk.load_model(ckpt, public_key=keys / "plant.pub")


def test_keys_made_by_openssl_work(tmp_path, signed, keys):
    """A key pair from ``openssl genpkey -algorithm ed25519`` signs and verifies the same way."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, pub = tmp_path / "o.pem", tmp_path / "o.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    sign_package(signed, key)
    assert verify_signed_package(signed, [pub])["identity"] is None
    with pytest.raises(PackageError, match="not a trusted key"):
        verify_signed_package(signed, [keys / "plant.pub"])


def _deploy(tmp_path: Path, pkg: Path, public_key) -> Path:
    text = (DEMO / "deploy.toml").read_text().replace('path = "model"', f'path = "{pkg}"\npublic_key = {json.dumps(public_key)}')
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def test_deploy_public_key_paths_are_checked(tmp_path, keys):
    cfg = DeployConfig.load(_deploy(tmp_path, DEMO / "model", [str(keys / "plant.pub")]))
    assert cfg.model.public_key == [keys / "plant.pub"]
    (tmp_path / "k.pub").write_text("x")
    assert DeployConfig.load(_deploy(tmp_path, DEMO / "model", "k.pub")).model.public_key == [tmp_path / "k.pub"]
    with pytest.raises(ConfigError, match=r"model.public_key .*nope.pub: no such public key file"):
        DeployConfig.load(_deploy(tmp_path, DEMO / "model", "nope.pub"))
    with pytest.raises(ConfigError, match=r"model.public_key must be a path or a non-empty list"):
        DeployConfig.load(_deploy(tmp_path, DEMO / "model", []))


@pytest.mark.parametrize("case", sorted(CASES))
def test_r1edge_run_refuses_unsigned_or_changed_packages_with_exit_2(tmp_path, signed, keys, case, capsys):
    CASES[case][0](signed)
    deploy = _deploy(tmp_path, signed, str(keys / "plant.pub"))
    assert main(["run", str(deploy), "--duration", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1edge run: error: ") and str(signed) in err and re.search(CASES[case][1], err), err


def test_the_controller_takes_a_signed_package_and_refuses_another_key(tmp_path, signed, keys):
    from sdk.service.controller import Controller

    with Controller.from_config(_deploy(tmp_path, signed, str(keys / "plant.pub"))) as ctrl:
        assert ctrl.step({}) is not None
    with pytest.raises(PackageError, match="not a trusted key"):
        Controller.from_config(_deploy(tmp_path, signed, str(keys / "other.pub")))
