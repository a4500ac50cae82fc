"""TLS, mutual TLS and bearer tokens, with certificates made at test time, through the stock tritonclient."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from _server_helpers import ServeProcess, glm_inputs, http, outputs, start_server, tritonclient_grpc as grpcclient

x509 = pytest.importorskip("cryptography.x509", reason="needs cryptography (test extra)")
import grpc  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from glm_image_onnx.server.security import SecurityConfig, bearer, exposure_warnings, is_loopback  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from glm_image_onnx.cli import main; sys.exit(main())"]
SMALL = dict(height=64, width=64, steps=1, seed=3)
TOKENS = ["first-token-aaaaaaaaaaaaaaaa", "second-token-bbbbbbbbbbbbbbbb"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 / localhost, a client certificate, and a foreign CA."""
    out = tmp_path_factory.mktemp("pki")
    files: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = out / f"{name}.pem"
        files[name].write_bytes(data)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, "test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert("other CA", other_key, "other CA", other_key, ca=True)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", ca.public_bytes(serialization.Encoding.PEM))
    server = _cert("localhost", server_key, "test CA", ca_key, server=True)
    write("server", server.public_bytes(serialization.Encoding.PEM))
    write("server_key", key_pem(server_key))
    write("client", _cert("client", client_key, "test CA", ca_key).public_bytes(serialization.Encoding.PEM))
    write("client_key", key_pem(client_key))
    write("stranger", _cert("stranger", stranger_key, "other CA", other_key).public_bytes(serialization.Encoding.PEM))
    write("stranger_key", key_pem(stranger_key))
    write("other_ca", other_ca.public_bytes(serialization.Encoding.PEM))
    tokens = out / "tokens.txt"
    tokens.write_text("# rotation: old and new token\n" + "\n".join(TOKENS) + "\n\n")
    files["tokens"] = tokens
    return files


@pytest.fixture(scope="module")
def tls_server(tiny_package: Path, pki):
    security = SecurityConfig(tls_cert=pki["server"], tls_key=pki["server_key"], token_file=pki["tokens"])
    srv = start_server(tiny_package, security=security, components=False)
    yield srv
    srv.stop()


def _client(url: str, pki, **kw) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]), **kw)


def _status(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_tokens_are_required_on_every_rpc_but_health(tls_server, pki, caplog):
    caplog.set_level(logging.DEBUG)
    with _client(tls_server.url, pki) as c:
        for headers in (None, _auth("wrong"), {"authorization": "Basic " + TOKENS[0]}, _auth(TOKENS[0] + "x")):
            assert _status(lambda: c.is_server_live(headers=headers)) == "StatusCode.UNAUTHENTICATED"
            assert _status(lambda: c.get_model_metadata("glm_image", headers=headers)) == "StatusCode.UNAUTHENTICATED"
            assert _status(lambda: c.infer("glm_image", glm_inputs(prompt="x", **SMALL), headers=headers)
                           ) == "StatusCode.UNAUTHENTICATED"
        message = ""
        try:
            c.is_server_ready()
        except InferenceServerException as e:
            message = e.message()
        assert "bearer token" in message and "authorization" in message
        for token in TOKENS:  # both tokens of the file are accepted
            assert c.is_server_ready(headers=_auth(token))
            result = c.infer("glm_image", glm_inputs(prompt="a key", **SMALL), outputs=outputs("image"),
                             headers=_auth(token))
            assert result.as_numpy("image").shape == (64, 64, 3)
    # health needs no token (probes carry none); reflection does
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with grpc.secure_channel(tls_server.url, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5, metadata=[("authorization", f"Bearer {TOKENS[1]}")]))
        assert "inference.GRPCInferenceService" in str(answer[0])
        # an unknown method is refused like a known one: no token, no service map
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/secret.Service/Method")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert not any(t in logged for t in TOKENS)


def test_streaming_needs_the_token(tls_server, pki):
    import queue

    for headers, ok in ((None, False), (_auth(TOKENS[0]), True)):
        with _client(tls_server.url, pki) as c:
            answers: queue.Queue = queue.Queue()
            c.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers,
                           stream_timeout=30)
            try:
                c.async_stream_infer("glm_image", glm_inputs(prompt="x", **SMALL), outputs=outputs("tokens"),
                                     parameters={"progress": False})
            except InferenceServerException:  # the stream already failed: the error is in the callback
                assert not ok
            result, error = answers.get(timeout=30)
            c.stop_stream()
        if ok:
            assert error is None and result.as_numpy("tokens") is not None
        else:
            assert error is not None and "UNAUTHENTICATED" in str(error.status())


def test_plaintext_or_untrusted_clients_do_not_connect(tls_server, pki):
    with grpcclient.InferenceServerClient(tls_server.url) as c:  # plaintext to a TLS port
        assert _status(lambda: c.is_server_live(headers=_auth(TOKENS[0]), client_timeout=5)) == "StatusCode.UNAVAILABLE"
    with grpcclient.InferenceServerClient(tls_server.url, ssl=True, root_certificates=str(pki["other_ca"])) as c:
        assert _status(lambda: c.is_server_live(headers=_auth(TOKENS[0]), client_timeout=5)) == "StatusCode.UNAVAILABLE"


HTTP_ROUTES = [("GET", "/v2"), ("GET", "/v2/models/glm_image"), ("GET", "/v2/models/glm_image/versions/1"),
               ("GET", "/v2/models/glm_image/ready"), ("GET", "/v2/models/glm_image/config"),
               ("GET", "/v2/models/stats"), ("GET", "/v2/models/glm_image/stats"), ("POST", "/v2/repository/index"),
               ("POST", "/v2/models/glm_image/infer"), ("GET", "/v1/models"), ("GET", "/v1/models/glm_image"),
               ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("GET", "/v2/models/nope")]


def test_http_tokens_on_every_route_but_health(tls_server, pki):
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    url = tls_server.http_url
    assert url.startswith("https://")
    for method, route in HTTP_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKENS[0]},
                        {"Authorization": f"Bearer {TOKENS[0]}x"}):
            status, answer_headers, body = http(method, url + route, b"{}" if method == "POST" else None, headers,
                                                context)
            assert status == 401, (route, headers, body)
            assert {k.lower(): v for k, v in answer_headers.items()}["www-authenticate"] == "Bearer"
            assert "bearer token" in body.decode(), body
    for route in ("/v2/health/live", "/v2/health/ready"):  # probes carry no token
        assert http("GET", url + route, context=context)[0] == 200
    openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
    for token in TOKENS:  # the OpenAI SDK's api key is the bearer token
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=context))
        assert client.images.generate(prompt="a key", size="64x64", extra_body={"steps": 1}).data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0,
                      http_client=openai.DefaultHttpxClient(verify=context)).models.list()
    with pytest.raises(OSError):  # plaintext to the TLS port
        http("GET", url.replace("https://", "http://") + "/v2/health/live", timeout=5)
    with pytest.raises(OSError):  # a server certificate this client does not trust
        http("GET", url + "/v2/health/live", context=ssl.create_default_context(cafile=str(pki["other_ca"])),
             timeout=5)


def test_token_reload(tls_server, pki, tmp_path):
    tokens_file = pki["tokens"]
    store = tls_server.server.tokens
    original = tokens_file.read_text()
    try:
        tokens_file.write_text("brand-new-token-cccccccccccc\n")
        assert store.reload()
        with _client(tls_server.url, pki) as c:
            assert c.is_server_live(headers=_auth("brand-new-token-cccccccccccc"))
            assert _status(lambda: c.is_server_live(headers=_auth(TOKENS[0]))) == "StatusCode.UNAUTHENTICATED"
            tokens_file.write_text("# nothing\n")
            assert not store.reload()  # an empty file keeps the previous tokens
            assert c.is_server_live(headers=_auth("brand-new-token-cccccccccccc"))
    finally:
        tokens_file.write_text(original)
        store.reload()


def test_mutual_tls(tiny_package: Path, pki):
    security = SecurityConfig(tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    srv = start_server(tiny_package, load=False, security=security)
    try:
        with _client(srv.url, pki) as c:  # no client certificate
            assert _status(lambda: c.is_server_live(client_timeout=5)) == "StatusCode.UNAVAILABLE"
        with _client(srv.url, pki, private_key=str(pki["stranger_key"]),
                     certificate_chain=str(pki["stranger"])) as c:  # signed by another CA
            assert _status(lambda: c.is_server_live(client_timeout=5)) == "StatusCode.UNAVAILABLE"
        with _client(srv.url, pki, private_key=str(pki["client_key"]), certificate_chain=str(pki["client"])) as c:
            assert c.is_server_live(client_timeout=5)
        live = srv.http_url + "/v2/health/live"  # HTTP takes the same client certificates
        for cert, key in ((None, None), (pki["stranger"], pki["stranger_key"])):
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            if cert is not None:
                context.load_cert_chain(str(cert), str(key))
            with pytest.raises(OSError):
                http("GET", live, context=context, timeout=5)
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        assert http("GET", live, context=context, timeout=5)[0] == 200
    finally:
        srv.stop()


def test_security_config_errors_and_exposure_warnings(pki, tmp_path):
    from glm_image_onnx.server.security import SecurityError, TokenStore

    with pytest.raises(SecurityError, match="go together"):
        SecurityConfig(tls_cert=pki["server"]).check()
    with pytest.raises(SecurityError, match="mutual TLS is TLS"):
        SecurityConfig(tls_client_ca=pki["ca"]).check()
    with pytest.raises(SecurityError, match="no such file"):
        SecurityConfig(token_file=tmp_path / "nope").check()
    (tmp_path / "empty").write_text("\n# c\n")
    with pytest.raises(SecurityError, match="no tokens"):
        TokenStore(tmp_path / "empty")
    (tmp_path / "notpem").write_text("hello")
    with pytest.raises(SecurityError, match="not a PEM"):
        SecurityConfig(tls_cert=tmp_path / "notpem", tls_key=pki["server_key"]).server_credentials()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert exposure_warnings("127.0.0.1", SecurityConfig()) == []
    both = exposure_warnings("0.0.0.0", SecurityConfig())
    assert len(both) == 2 and "without TLS" in both[0] and "without authentication" in both[1]
    secured = SecurityConfig(tls_cert=pki["server"], tls_key=pki["server_key"], token_file=pki["tokens"])
    assert exposure_warnings("0.0.0.0", secured) == []
    assert bearer([("authorization", "Bearer abc")]) == b"abc"
    assert bearer([("Authorization", "bearer  abc ")]) == b"abc"
    assert bearer([("authorization", "Basic abc")]) is None and bearer([]) is None


def test_cli_serve_and_client_with_tls_tokens_and_sighup(tiny_package: Path, pki, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS[0] + "\n")
    server = ServeProcess(tiny_package, "--no-verify", "--no-components", "--tls-cert", str(pki["server"]),
                          "--tls-key", str(pki["server_key"]), "--token-file", str(tokens),
                          log_path=tmp_path / "serve.log", tls_ca=pki["ca"])
    try:
        server.wait_ready()
        client = CLI + ["client", "--url", server.url, "--prompt",
                        "a boat", "--height", "64", "--width", "64", "--steps", "1", "--tls-ca", str(pki["ca"])]
        denied = subprocess.run(client + ["--out", str(tmp_path / "a.png")], capture_output=True, text=True,
                                timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        ok = subprocess.run(client + ["--token-file", str(tokens), "--out", str(tmp_path / "a.png")],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "a.png").stat().st_size > 0
        tokens.write_text(TOKENS[1] + "\n")
        server.signal(signal.SIGHUP)
        server.wait_for_log("reloaded 1 bearer token")
        stream = subprocess.run(client + ["--token", TOKENS[1], "--stream", "--out", str(tmp_path / "b.png")],
                                capture_output=True, text=True, timeout=60)
        assert stream.returncode == 0, stream.stderr
        old = subprocess.run(client + ["--token", TOKENS[0], "--out", str(tmp_path / "c.png")],
                             capture_output=True, text=True, timeout=60, env={**os.environ})
        assert old.returncode == 1 and "not accepted" in old.stderr
    finally:
        code = server.stop(30)
    assert code == 0
    log = server.log
    assert "TLS, 1 bearer token(s)" in log and "reloaded 1 bearer token(s)" in log
    assert not any(t in log for t in TOKENS)


def test_start_up_warns_when_exposed_without_protection(tiny_package: Path, monkeypatch, caplog):
    import glm_image_onnx.server.security as security

    monkeypatch.setattr(security, "is_loopback", lambda host: False)  # pretend 127.0.0.1 is a public address
    caplog.set_level(logging.WARNING, logger="glm_image_onnx.server")
    srv = start_server(tiny_package, load=False)
    srv.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without TLS" in w for w in warnings) and any("without authentication" in w for w in warnings)
