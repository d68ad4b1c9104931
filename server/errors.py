"""The service's domain errors and the one place that turns them into gRPC status codes.

Code anywhere raises one of these (or :class:`nann_common.contract.InvalidRequest`);
:func:`status_of` maps an exception to (code, message). Anything else is a server fault:
INTERNAL with a generic message, its traceback logged, never sent to the client.
"""

from __future__ import annotations

import grpc

from nann_common.contract import InvalidRequest
from nann_common.errors import NannError


class ServiceError(NannError):
    """Base of the errors a client is told about; ``code`` is the gRPC status."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    """The request is well-formed but the serving model cannot honour it (e.g. an old export)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UserNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    """A dependency (feature store, model backend) is down or the model is not loaded yet."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


INTERNAL_MESSAGE = "internal error; the server logged it with this request's id"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, client-facing message) of an exception; unknown errors -> INTERNAL, generic."""
    if isinstance(error, ServiceError):
        return error.code, str(error)
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
