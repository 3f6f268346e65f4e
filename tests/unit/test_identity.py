"""Identity files, agent ids and the auth signature, checked against Node's crypto too."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess

import pytest

from agentctl_swarm.agentchat.identity import (
    Identity,
    IdentityError,
    agent_id_for,
    verify_auth,
)

NODE = shutil.which("node")


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate("swarm-builder-001")


def test_agent_id_is_sha256_of_the_pem_text(ident: Identity) -> None:
    expected = "@" + hashlib.sha256(ident.pubkey_pem.encode()).hexdigest()[:16]
    assert ident.agent_id == expected == agent_id_for(ident.pubkey_pem)
    assert ident.pubkey_pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert ident.pubkey_pem.endswith("-----END PUBLIC KEY-----\n")


def test_sign_auth_verifies_and_rejects_tampering(ident: Identity) -> None:
    sig = ident.sign_auth("ab" * 16, "chal_x_1", 1700000000123)
    assert verify_auth(ident.pubkey_pem, "ab" * 16, "chal_x_1", 1700000000123, sig)
    assert not verify_auth(ident.pubkey_pem, "ab" * 16, "chal_x_1", 1700000000124, sig)
    assert not verify_auth(ident.pubkey_pem, "cd" * 16, "chal_x_1", 1700000000123, sig)
    other = Identity.generate("other")
    assert not verify_auth(other.pubkey_pem, "ab" * 16, "chal_x_1", 1700000000123, sig)
    assert not verify_auth(ident.pubkey_pem, "n", "c", 1, "not base64!!")
    assert not verify_auth("not a pem", "n", "c", 1, sig)


def test_repr_never_shows_the_private_key(ident: Identity, tmp_path) -> None:
    path = tmp_path / "id.json"
    ident.save(path)
    privkey = json.loads(path.read_text())["privkey"]
    body = privkey.splitlines()[1]
    assert "PRIVATE" not in repr(ident) and body not in repr(ident)
    assert "private_key" not in repr(ident)


def test_save_load_round_trip_with_modes(ident: Identity, tmp_path) -> None:
    path = tmp_path / "a" / "b" / "id.json"
    old = os.umask(0)  # even with no umask the file must be 0600 and dirs 0700
    try:
        ident.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert set(data) == {"name", "pubkey", "privkey", "created"}
    assert data["privkey"].startswith("-----BEGIN PRIVATE KEY-----")
    assert data["created"].endswith("Z")
    loaded = Identity.load(path)
    assert (loaded.name, loaded.pubkey_pem, loaded.agent_id) == (
        ident.name, ident.pubkey_pem, ident.agent_id)
    sig = loaded.sign_auth("n", "c", 5)
    assert verify_auth(ident.pubkey_pem, "n", "c", 5, sig)
    assert [p.name for p in path.parent.iterdir()] == ["id.json"]  # no temp file left


def test_save_replaces_an_existing_file(tmp_path) -> None:
    path = tmp_path / "id.json"
    Identity.generate("first").save(path)
    second = Identity.generate("second")
    second.save(path)
    assert Identity.load(path).agent_id == second.agent_id


def test_load_accepts_the_real_clients_field_names(ident: Identity, tmp_path) -> None:
    path = tmp_path / "id.json"
    ident.save(path)
    data = json.loads(path.read_text())
    alt = {"name": data["name"], "publicKey": data["pubkey"],
           "privateKey": data["privkey"], "created": data["created"]}
    path.write_text(json.dumps(alt))
    assert Identity.load(path).agent_id == ident.agent_id


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"name": "bad name!", "pubkey": "x", "privkey": "y"}', "name"),
    ('{"name": "ok"}', "missing pubkey"),
    ('{"name": "ok", "pubkey": "x", "privkey": "y"}', "privkey"),
])
def test_load_errors_name_the_file(tmp_path, content, problem) -> None:
    path = tmp_path / "id.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(IdentityError) as info:
        Identity.load(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_load_refuses_mismatched_keys(tmp_path) -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    path = tmp_path / "id.json"
    a.save(path)
    data = json.loads(path.read_text())
    data["pubkey"] = b.pubkey_pem
    path.write_text(json.dumps(data))
    with pytest.raises(IdentityError, match="does not match"):
        Identity.load(path)


def test_generate_refuses_invalid_names() -> None:
    with pytest.raises(ValueError):
        Identity.generate("has space")
    with pytest.raises(ValueError):
        Identity.generate("x" * 33)


NODE_CHECK = r"""
const crypto = require('crypto');
const [pem, nonce, cid, ts, sig] = JSON.parse(process.argv[1]);
const id = crypto.createHash('sha256').update(pem).digest('hex').substring(0, 16);
const ok = crypto.verify(null, Buffer.from(`AGENTCHAT_AUTH|${nonce}|${cid}|${ts}`),
                         crypto.createPublicKey(pem), Buffer.from(sig, 'base64'));
const kp = crypto.generateKeyPairSync('ed25519');
console.log(JSON.stringify({id: '@' + id, ok,
  pub: kp.publicKey.export({type: 'spki', format: 'pem'}),
  priv: kp.privateKey.export({type: 'pkcs8', format: 'pem'})}));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed; cannot cross-check with Node crypto")
def test_node_crypto_agrees(ident: Identity, tmp_path) -> None:
    """The real server is Node: same agent id, our signature verifies, its keys load here."""
    sig = ident.sign_auth("f" * 32, "chal_abc_01234567", 1700000000999)
    args = json.dumps([ident.pubkey_pem, "f" * 32, "chal_abc_01234567", 1700000000999, sig])
    out = subprocess.run([NODE, "-e", NODE_CHECK, args], capture_output=True, text=True,
                         timeout=30, check=True)
    result = json.loads(out.stdout)
    assert result["id"] == ident.agent_id
    assert result["ok"] is True
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"name": "noded", "pubkey": result["pub"],
                                "privkey": result["priv"], "created": "x"}))
    loaded = Identity.load(path)
    assert loaded.pubkey_pem == result["pub"]
    assert verify_auth(result["pub"], "n", "c", 1, loaded.sign_auth("n", "c", 1))
    assert base64.b64decode(sig) and len(base64.b64decode(sig)) == 64
