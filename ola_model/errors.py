"""Errors raised by ``ola_model``. Each names the input, the field and the limit, so services can map them to
gRPC codes (``InputError`` -> INVALID_ARGUMENT, ``CheckpointError`` -> FAILED_PRECONDITION)."""

from __future__ import annotations


class OlaError(Exception):
    """Base class of every error ``ola_model`` raises on purpose."""


class InputError(OlaError, ValueError):
    """A request input is invalid: corrupt or unsupported media, wrong shape, over a limit."""


class MediaError(InputError):
    """A media file or buffer cannot be decoded, or is of an unsupported kind."""

    def __init__(self, kind: str, source: str, reason: str) -> None:
        self.kind = kind
        self.source = source
        self.reason = reason
        super().__init__(f"{kind} {source}: {reason}")


class LimitError(InputError):
    """An input exceeds a configured limit (``OlaConfig.limits``)."""

    def __init__(self, what: str, value: int, limit: int, hint: str = "") -> None:
        self.what = what
        self.value = value
        self.limit = limit
        message = f"{what} is {value}, over the limit of {limit}"
        super().__init__(f"{message}; {hint}" if hint else message)


class CheckpointError(OlaError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped keys, or unreadable files."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = sorted(missing or [])
        self.unexpected = sorted(unexpected or [])
        self.mismatched = sorted(mismatched or [])
        lines = [message]
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}):")
            lines += [f"  - {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}):")
            lines += [f"  - {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"mis-shaped keys ({len(self.mismatched)}):")
            lines += [f"  - {k}: checkpoint {list(got)} vs model {list(want)}" for k, got, want in self.mismatched]
        super().__init__("\n".join(lines))
