"""Request errors: a gRPC status code and a message that names the offending field.

Everything a client did wrong raises `RequestError`; the KServe layer turns it into the call's
status (unary) or the stream response's `error_message` (streaming), and the server keeps serving.
`code` is a gRPC status name ("INVALID_ARGUMENT"), so this module (and the request logic shared
with the Triton Python model) does not need grpc.
"""

from __future__ import annotations


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def invalid(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


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


def unimplemented(message: str) -> RequestError:
    return RequestError("UNIMPLEMENTED", message)


def internal(message: str) -> RequestError:
    return RequestError("INTERNAL", message)
