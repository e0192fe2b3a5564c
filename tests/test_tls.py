"""TLS for HTTP and the kernel WebSocket, with and without client certificates."""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.client import new_message

pytestmark = pytest.mark.security


def make_cert(directory: Path, name: str, issuer: tuple[Any, Any] | None = None, ca: bool = False) -> tuple[Any, Any]:
    """A certificate for 127.0.0.1 (self-signed, or signed by ``issuer``); writes NAME.pem and NAME.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        import ipaddress

        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
            "127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return cert, key


def test_https_and_wss(make_gateway: Any, tmp_path: Path) -> None:
    """With a certificate egd serves HTTPS and WSS only; a client trusting it runs a cell over wss://."""
    make_cert(tmp_path, "server")
    gw = make_gateway({"server": {"certfile": str(tmp_path / "server.pem"), "keyfile": str(tmp_path / "server.key")}},
                      https=True, cafile=str(tmp_path / "server.pem"))
    context = ssl.create_default_context(cafile=str(tmp_path / "server.pem"))
    base = f"https://127.0.0.1:{gw.port}"
    with urllib.request.urlopen(f"{base}/api", context=context, timeout=10) as resp:
        assert json.loads(resp.read())["gateway_version"]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/api", timeout=10)
    request = urllib.request.Request(f"{base}/api/kernels", data=b"{}", method="POST")
    with urllib.request.urlopen(request, context=context, timeout=90) as resp:
        kernel_id = json.loads(resp.read())["id"]
    ws = websocket.create_connection(f"wss://127.0.0.1:{gw.port}/api/kernels/{kernel_id}/channels",
                                     sslopt={"ca_certs": str(tmp_path / "server.pem")}, timeout=30)
    msg = new_message("execute_request", {"code": "6*7", "silent": False, "store_history": False,
                                          "user_expressions": {}, "allow_stdin": False}, "tls")
    ws.send(json.dumps(msg))
    result = None
    while result is None:
        reply = json.loads(ws.recv())
        if reply["msg_type"] == "execute_result":
            result = reply["content"]["data"]["text/plain"]
    assert result == "42"
    ws.close()
    delete = urllib.request.Request(f"{base}/api/kernels/{kernel_id}", method="DELETE")
    with urllib.request.urlopen(delete, context=context, timeout=30) as resp:
        assert resp.status == 204


def test_client_certificates(make_gateway: Any, tmp_path: Path) -> None:
    """With client_ca, a client without a certificate signed by that CA is refused at the handshake."""
    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server")
    make_cert(tmp_path, "client", issuer=ca)
    gw = make_gateway({"server": {"certfile": str(tmp_path / "server.pem"), "keyfile": str(tmp_path / "server.key"),
                                  "client_ca": str(tmp_path / "ca.pem")}},
                      https=True, cafile=str(tmp_path / "server.pem"),
                      client_cert=(str(tmp_path / "client.pem"), str(tmp_path / "client.key")))
    base = f"https://127.0.0.1:{gw.port}/api"
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "server.pem"))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(base, context=anonymous, timeout=10).read()
    holder = ssl.create_default_context(cafile=str(tmp_path / "server.pem"))
    holder.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    with urllib.request.urlopen(base, context=holder, timeout=10) as resp:
        assert resp.status == 200


def test_tls_config_errors() -> None:
    """A certificate without its key, or a missing file, is a config error."""
    from egd.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="both"):
        parse_config("server: {certfile: /etc/hostname}", environ={})
    with pytest.raises(ConfigError, match="not a readable file"):
        parse_config("server: {certfile: /nonexistent.pem, keyfile: /nonexistent.key}", environ={})
