"""Typed errors for the whole library; translated to exit codes (CLI) and 4xx (HTTP) at the edges."""
from __future__ import annotations


class T2CError(Exception):
    """Base error: a message naming the problem and a hint naming the fix."""

    http_status = 400
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def __reduce__(self):
        """Pickle by state, so errors cross process boundaries (worker pools) intact."""
        return (_rebuild_error, (type(self), self.__dict__.copy()))


def _rebuild_error(cls, state):
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message"))
    err.__dict__.update(state)
    return err


class InvalidInput(T2CError):
    """A user-supplied value is malformed or out of range."""


class NotFound(T2CError):
    """A named thing (file, store, id, encoder) does not exist."""

    http_status = 404


class UnknownChoice(InvalidInput):
    """A name is not one of the valid choices; the message lists them."""

    def __init__(self, kind: str, value: str, choices):
        choices = sorted(choices)
        super().__init__(f"unknown {kind} {value!r}", f"valid {kind}s: {', '.join(choices)}")
        self.choices = choices


class EncoderError(T2CError):
    """An encoder could not be built or used (bad spec, missing weights, no text tower)."""


class AlignerError(T2CError):
    """An aligner file is invalid or does not match the encoder/CLIP pair."""


class DamagedArtefact(T2CError):
    """A saved artefact (aligner, model weights, caption decoder, concept bottleneck, checkpoint) cannot be
    read: it is truncated or corrupt, or it is another kind of file than the one expected."""


class StoreError(T2CError):
    """A store is missing, corrupt, locked, or does not match its manifest."""

    http_status = 409


class DiskFull(StoreError):
    """The disk (or quota) holding a store filled up during a write; the live snapshot is unchanged."""

    http_status = 507


class StoreNotWritable(StoreError):
    """A store folder cannot be written (read-only file system, or no permission)."""


class SourceGone(NotFound):
    """The image folder (or a listed file's folder) disappeared while a run was reading it."""


class ImageDecodeError(T2CError):
    """An image file could not be decoded safely; `reason` is a short machine-friendly tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class QuerySyntaxError(InvalidInput):
    """A query string could not be parsed; names the position and what was expected."""

    def __init__(self, message: str, position: int, expected: str | None = None, query: str | None = None):
        hint = f"expected {expected}" if expected else None
        super().__init__(f"{message} at position {position}", hint)
        self.position = position
        self.expected = expected
        self.query = query


class Forbidden(T2CError):
    """A request reaches outside what the store may serve (a catalogued file outside its indexed folders)."""

    http_status = 403


class NotAvailable(T2CError):
    """A feature this store or this installation cannot provide (an optional package, a caption decoder)."""

    http_status = 501
