"""The errors of the backbone pipeline."""

from __future__ import annotations


class BackboneError(RuntimeError):
    """A backbone could not be fetched, converted, verified or found."""


class ChecksumMismatchError(BackboneError):
    """A file's sha256 differs from the one expected."""
