"""Request errors: a gRPC status code and a message that names the offending field.

Everything a client did wrong raises `RequestError`; the KServe layer turns it into the call's
status (unary) or the stream response's `error_message` (streaming), and the server keeps serving.
`code` is a gRPC status name ("INVALID_ARGUMENT"), so this module (and the request logic shared
with the Triton Python model) does not need grpc; the HTTP front end maps it with `HTTP_STATUS`
(as Triton's HTTP endpoint does). `field` names the request field at fault where there is one
(the OpenAI API reports it as the error's `param`).
"""

from __future__ import annotations


# gRPC status name -> HTTP status of the same error (KServe v2 REST and the OpenAI API)
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "REQUEST_TIMEOUT": 408, "PAYLOAD_TOO_LARGE": 413,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNIMPLEMENTED": 501,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class RequestError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __str__(self) -> str:
        return self.message


def invalid(message: str, field: str | None = None) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message, field)


def not_found(message: str) -> RequestError:
    return RequestError("NOT_FOUND", message)


def unavailable(message: str) -> RequestError:
    return RequestError("UNAVAILABLE", message)


def exhausted(message: str) -> RequestError:
    return RequestError("RESOURCE_EXHAUSTED", message)


def cancelled(message: str = "the request was cancelled by the client") -> RequestError:
    return RequestError("CANCELLED", message)


def deadline(message: str = "the request's deadline passed before it finished") -> RequestError:
    return RequestError("DEADLINE_EXCEEDED", message)


def internal(message: str) -> RequestError:
    """A failure that is ours, `message` saying what failed: for the server's log, never the client
    (`inference.infer` logs it and answers `internal_answer` instead)."""
    return RequestError("INTERNAL", message)


def internal_answer(request_id: str) -> RequestError:
    """What a client is told of a failure that is ours (a bug, onnxruntime failing on inputs we
    accepted): the request id that the log line with the exception carries, never the exception
    itself, whose class and message may hold internals (paths, shapes, library versions)."""
    return RequestError("INTERNAL", f"internal error: the server's log has the details under request id {request_id}")


def unauthenticated(message: str) -> RequestError:
    return RequestError("UNAUTHENTICATED", message)


def too_large(message: str) -> RequestError:
    """HTTP only (gRPC refuses an oversized message itself, RESOURCE_EXHAUSTED)."""
    return RequestError("PAYLOAD_TOO_LARGE", message)


def request_timeout(message: str) -> RequestError:
    """HTTP only: the client stalled while sending (gRPC has its own keepalive and deadlines)."""
    return RequestError("REQUEST_TIMEOUT", message)


def no_shared_memory(what: str) -> RequestError:
    """A tensor that names a shared-memory region (Triton's extension, which this server lacks)."""
    return invalid(f"{what}: shared memory is not supported by this server; send the data inline")
