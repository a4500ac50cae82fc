"""Transport security and authentication of the gRPC server: TLS (optionally mutual) and bearer tokens.

- TLS: `--tls-cert` / `--tls-key` (PEM) serve gRPC over TLS; `--tls-client-ca` also requires every
  client to present a certificate signed by that CA (mutual TLS).
- Tokens: `--token-file` holds one token per line (blank lines and `#` comments ignored; several
  tokens allow rotation). Every RPC must carry `authorization: Bearer <token>` metadata, except the
  `grpc.health.v1.Health` checks (load balancers and kubelet probes carry no credentials). Server
  reflection needs a token too: it lists the services, which is no business of an anonymous peer
  (`grpcurl -H 'authorization: Bearer ...'`). A missing or wrong token gets `UNAUTHENTICATED`
  before any handler runs. Tokens are compared in constant time (`hmac.compare_digest`, against every
  configured token, no early exit) and never logged; SIGHUP re-reads the file (a file that cannot be
  read keeps the previous tokens).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_image_onnx.errors import UsageError

log = logging.getLogger("glm_image_onnx.server")

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # RPCs that need no token


class SecurityError(UsageError):
    """Bad TLS or token configuration (a startup error)."""


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and not self.tls:
            raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca), ("--token-file", self.token_file)):
            if path is not None and not Path(path).is_file():
                raise SecurityError(f"{flag} {path}: no such file")

    def server_credentials(self) -> Any:
        import grpc

        def read(flag: str, path: Path) -> bytes:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise SecurityError(f"{flag} {path}: {e.strerror}") from None
            if b"-----BEGIN" not in data:
                raise SecurityError(f"{flag} {path}: not a PEM file")
            return data

        assert self.tls_cert is not None and self.tls_key is not None
        pair = (read("--tls-key", self.tls_key), read("--tls-cert", self.tls_cert))
        ca = read("--tls-client-ca", self.tls_client_ca) if self.tls_client_ca is not None else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def read_tokens(path: Path) -> list[bytes]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"--token-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    tokens = [line.strip().encode("utf-8") for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith(b"#")]
    if not tokens:
        raise SecurityError(f"--token-file {path}: no tokens in it (one per line)")
    for t in tokens:
        if any(c <= 0x20 or c == 0x7F for c in t):
            raise SecurityError(f"--token-file {path}: a token contains spaces or control characters")
    return tokens


class TokenStore:
    """The accepted bearer tokens; `reload` re-reads the file (SIGHUP)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._tokens = read_tokens(self.path)
        log.info("authentication: %d bearer token(s) from %s", len(self._tokens), self.path)

    def __len__(self) -> int:
        return len(self._tokens)

    def reload(self) -> bool:
        try:
            tokens = read_tokens(self.path)
        except SecurityError as e:
            log.error("token reload failed, keeping the %d previous token(s): %s", len(self._tokens), e)
            return False
        with self._lock:
            self._tokens = tokens
        log.info("authentication: reloaded %d bearer token(s) from %s", len(tokens), self.path)
        return True

    def accepts(self, presented: bytes) -> bool:
        with self._lock:
            tokens = self._tokens
        ok = False
        for token in tokens:  # every token compared: the time does not tell which (or whether one) matched
            ok |= hmac.compare_digest(presented, token)
        return ok


def bearer(metadata: Any) -> bytes | None:
    """The token of the `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, str):
            value = value.encode("utf-8", "replace")
        scheme, _, token = bytes(value).strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
        return None
    return None


def auth_interceptor(tokens: TokenStore) -> Any:
    """A grpc.aio server interceptor: UNAUTHENTICATED for every RPC without an accepted token."""
    import grpc

    async def deny_missing(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'")

    async def deny_wrong(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted by this server")

    def refusal(handler: Any, deny: Any) -> Any:
        if handler is None:  # unknown method: refused the same way, so that no service list leaks
            return grpc.unary_unary_rpc_method_handler(deny)
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)

    class AuthInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            if handler_call_details.method.startswith(OPEN_PREFIXES):
                return await continuation(handler_call_details)
            token = bearer(handler_call_details.invocation_metadata)
            if token is not None and tokens.accepts(token):
                return await continuation(handler_call_details)
            handler = await continuation(handler_call_details)
            return refusal(handler, deny_missing if token is None else deny_wrong)

    return AuthInterceptor()


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, security: SecurityConfig) -> list[str]:
    """What is unprotected when the server listens beyond the loopback interface."""
    if is_loopback(host):
        return []
    out = []
    if not security.tls:
        out.append(f"listening on {host} without TLS: requests, images and tokens cross the network in "
                   "plaintext (--tls-cert/--tls-key, or a TLS-terminating proxy)")
    if security.token_file is None and security.tls_client_ca is None:
        out.append(f"listening on {host} without authentication: anyone who reaches the port can run "
                   "inference (--token-file, or --tls-client-ca for mutual TLS)")
    return out
