"""Signed packages: who made the model that is about to drive the plant.

A package's ``manifest.json`` holds the sha256 of every other file, so a signature over the
manifest covers the whole package. :func:`sign_package` writes ``signature.json`` next to the
manifest (a separate file, not listed in it): the signer's Ed25519 public key, its
fingerprint, an optional identity (free text such as ``"Plant ML team <ml@example.com>"``),
the manifest's sha256 and the signature over all of these. :func:`verify_signature` checks it
against trusted public keys; :func:`verify_signed_package` also checks every file against the
manifest (``sdk.tools.package.verify_package``), which ``load_model(..., public_key=...)``,
the Controller (``[model] public_key``), ``r1edge run`` and ``r1edge verify`` use.

Keys are Ed25519 in PEM (PKCS#8 private key, SubjectPublicKeyInfo public key), as
:func:`make_signing_key` (``r1edge keys OUT_DIR --signing``) or ``openssl genpkey -algorithm
ed25519`` writes them. Everything here is offline: no certificate authority, no
transparency log. Why not the OpenSSF ``model-signing`` library: see docs/security/packages.md.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdk.tools.package import MANIFEST, SIGNATURE, PackageError, verify_package

SIGNATURE_FORMAT = "r1edge-package-signature"
_DOMAIN = b"r1edge package signature v1\n"       # signed bytes never double as another message


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: Ed25519PublicKey) -> str:
    """``"sha256:<hex>"`` of the raw 32-byte public key (what ``r1edge inspect`` shows)."""
    return "sha256:" + hashlib.sha256(_raw(public)).hexdigest()


def make_signing_key(out_dir: str | os.PathLike, name: str = "signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``NAME.pem`` (private, mode 0600) and ``NAME.pub``
    (public, for ``[model] public_key`` and ``r1edge verify``). Refuses to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.pem", out / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise FileExistsError(f"{p}: exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; ValueError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 key (make one with r1edge keys --signing)")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ValueError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def _signed_bytes(statement: dict[str, Any]) -> bytes:
    return _DOMAIN + json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_package(path: str | os.PathLike, private_key: str | os.PathLike, identity: str | None = None) -> dict:
    """Verify the package's files against its manifest, then write ``signature.json`` signing
    the manifest with ``private_key``. Returns the signature record."""
    path = Path(path)
    verify_package(path)
    key = load_private_key(private_key)
    manifest_sha256 = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    statement = {"format": SIGNATURE_FORMAT, "version": 1, "algorithm": "ed25519",
                 "public_key": base64.b64encode(_raw(key.public_key())).decode(),
                 "fingerprint": fingerprint(key.public_key()), "identity": identity,
                 "manifest_sha256": manifest_sha256}
    record = {**statement, "signature": base64.b64encode(key.sign(_signed_bytes(statement))).decode()}
    tmp = path / (SIGNATURE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path / SIGNATURE)
    return record


def read_signature(path: str | os.PathLike) -> dict | None:
    """The package's signature record, checked in form only (None when unsigned); PackageError
    naming the package when it is malformed."""
    file = Path(path) / SIGNATURE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{file}: not valid JSON ({str(exc)[:200]})") from None
    keys = ("format", "version", "algorithm", "public_key", "fingerprint", "identity", "manifest_sha256", "signature")
    if (not isinstance(record, dict) or sorted(record) != sorted(keys) or record["format"] != SIGNATURE_FORMAT
            or record["version"] != 1 or record["algorithm"] != "ed25519"
            or not all(isinstance(record[k], str) for k in keys if k not in ("version", "identity"))
            or not (record["identity"] is None or isinstance(record["identity"], str))):
        raise PackageError(f"{file}: not an r1edge package signature (version 1, ed25519)")
    return record


def signer(path: str | os.PathLike) -> dict | None:
    """Who signed the package, as its signature says (``fingerprint``, ``identity``) and whether
    that signature is intact for the key it names (``intact``: the manifest is the signed one and
    the signature verifies). None when unsigned. Says nothing about trust: only a trusted public
    key (:func:`verify_signature`) does."""
    record = read_signature(path)
    if record is None:
        return None
    try:
        _check(Path(path), record, None)
        intact = True
    except PackageError:
        intact = False
    return {"fingerprint": record["fingerprint"], "identity": record["identity"], "intact": intact}


def _check(path: Path, record: dict, trusted: dict[bytes, str] | None) -> None:
    where = f"{path}"
    try:
        raw = base64.b64decode(record["public_key"], validate=True)
        signature = base64.b64decode(record["signature"], validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{where}: {SIGNATURE} is malformed ({exc})") from None
    if record["fingerprint"] != fingerprint(public):
        raise PackageError(f"{where}: {SIGNATURE} names fingerprint {record['fingerprint']} for another key")
    if trusted is not None and raw not in trusted:
        raise PackageError(f"{where}: signed by {record['fingerprint']}"
                           f"{' (' + record['identity'] + ')' if record['identity'] else ''}, which is not a "
                           f"trusted key (trusted: {', '.join(sorted(trusted.values()))})")
    statement = {k: v for k, v in record.items() if k != "signature"}
    try:
        public.verify(signature, _signed_bytes(statement))
    except InvalidSignature:
        raise PackageError(f"{where}: {SIGNATURE} does not verify for {record['fingerprint']} "
                           "(the signature record was altered)") from None
    actual = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    if actual != record["manifest_sha256"]:
        raise PackageError(f"{where}: {MANIFEST} changed after signing (sha256 {actual[:16]}..., signed "
                           f"{record['manifest_sha256'][:16]}...)")


def verify_signature(path: str | os.PathLike, public_keys: Iterable[str | os.PathLike]) -> dict:
    """Check that the package is signed by one of ``public_keys`` and its manifest is the one
    signed; returns the signature record. PackageError naming the package and what failed:
    unsigned, signed by an untrusted key, the signature altered, the manifest changed."""
    path = Path(path)
    keys = list(public_keys)
    if not keys:
        raise ValueError("verify_signature needs at least one public key")
    trusted = {_raw(k): fingerprint(k) for k in map(load_public_key, keys)}
    record = read_signature(path)
    if record is None:
        raise PackageError(f"{path}: unsigned ({SIGNATURE} is missing) but a signed package is required "
                           "(sign it with r1edge sign PKG --key PRIVATE)")
    _check(path, record, trusted)
    return record


def verify_signed_package(path: str | os.PathLike, public_keys: Iterable[str | os.PathLike]) -> dict:
    """:func:`verify_signature`, then every file against the signed manifest (presence, size,
    sha256, no extra files): what loading a package with a public key checks. Returns the
    signature record; PackageError naming the package (and the file) otherwise."""
    record = verify_signature(path, public_keys)
    verify_package(path)
    return record
