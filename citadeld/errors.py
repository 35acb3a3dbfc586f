"""Domain errors that carry their HTTP meaning, so each dialect renders them without guessing."""

from __future__ import annotations


class CitadelError(Exception):
    """An error a client may see: HTTP status, a stable machine code, a human message."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.param = param


class BadRequest(CitadelError):
    status = 400
    code = "invalid_request"


class NotFound(CitadelError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(CitadelError):
    status = 413
    code = "payload_too_large"


class Overloaded(CitadelError):
    status = 429
    code = "overloaded"


class UpstreamError(CitadelError):
    status = 502
    code = "upstream_error"


class Unavailable(CitadelError):
    status = 503
    code = "unavailable"


class UpstreamTimeout(CitadelError):
    status = 504
    code = "upstream_timeout"


class BackendError(Exception):
    """A backend call failed. `retryable` failures may go to another endpoint; client errors
    (the input itself is bad) never are, and are isolated to the offending item."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # connect | timeout | status | protocol | client | died
        self.status = status
        self.retry_after = retry_after
        self.endpoint = endpoint

    @property
    def retryable(self) -> bool:
        return self.kind != "client"

    def to_client_error(self) -> CitadelError:
        """What the caller sees once no endpoint could serve the item."""
        if self.kind == "client":
            return BadRequest(self.message, code="input_rejected")
        if self.kind == "timeout":
            return UpstreamTimeout(f"embedding backend timed out: {self.message}")
        if self.kind in ("connect", "died") or self.status in (429, 503):
            return Unavailable(
                f"embedding backend unavailable: {self.message}",
                retry_after=self.retry_after or 1.0,
            )
        return UpstreamError(f"embedding backend failed: {self.message}")


class ItemError(Exception):
    """One input of a batch failed on its own (too long, non-finite output); its batch-mates
    are unaffected."""

    def __init__(self, error: BackendError, index: int | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.index = index
