"""The error hierarchy services raise; translated to a ``Fault`` on the bus and to HTTP
at the gateway's edge only.
"""

from __future__ import annotations

from virtbackup.contracts.v1.common import Fault, FaultCode


class ServiceError(Exception):
    """Base of every error a command can answer with. ``code`` says if a retry can help."""

    code: FaultCode = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_fault(self) -> Fault:
        return Fault(code=self.code, message=self.message)

    @staticmethod
    def from_fault(fault: Fault) -> ServiceError:
        cls = _BY_CODE.get(fault.code, ServiceError)
        return cls(fault.message)


class BadRequest(ServiceError):
    code: FaultCode = "bad_request"


class NotFound(ServiceError):
    code: FaultCode = "not_found"


class Conflict(ServiceError):
    code: FaultCode = "conflict"


class Unavailable(ServiceError):
    """Transient: the callee is down, timed out or overloaded; a retry can help."""

    code: FaultCode = "unavailable"


_BY_CODE: dict[str, type[ServiceError]] = {
    "bad_request": BadRequest,
    "not_found": NotFound,
    "conflict": Conflict,
    "unavailable": Unavailable,
}
