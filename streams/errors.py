"""Errors of the media layer. Messages name the stream and never carry a password."""

from __future__ import annotations


class StreamError(Exception):
    """Base of every media error raised by framegrid's streams package."""


class SourceOpenError(StreamError):
    """A source could not be opened (unreachable, refused, not found, timed out)."""


class NotVideoError(StreamError):
    """The URL opened but holds no decodable video stream."""


class StreamStalled(StreamError):
    """No frame arrived for longer than the stall timeout."""
