"""What an API client may name: network streams, and files inside `api.media_dirs` only.

The config file is the operator's and may name any file or FFmpeg URL. A client of the HTTP API
is not: a stream URL, a session's avatar, audio and output, and a talk job's input paths given
through the API are checked here. Files must resolve (symlinks and `..` followed) inside one of
`api.media_dirs` (default: the config's folder); URLs must use a network scheme, so FFmpeg's
file-reading protocols (`concat:`, `subfile,`, `file:` outside the folders...) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from streams import is_local_file

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt", "udp", "tcp", "rtp")


class ClientPathError(ValueError):
    """A path or URL an API client may not use (the message says why, without the server's folders)."""


class ClientPaths:
    def __init__(self, media_dirs: Sequence[Path], base_dir: Path) -> None:
        self.base_dir = base_dir
        self.dirs = [d.resolve() for d in media_dirs]

    def file(self, value: str | Path) -> Path:
        """`value` (relative: to the config's folder) resolved, if inside the media folders."""
        if "\x00" in str(value):
            raise ClientPathError("a path cannot contain a NUL byte")
        path = Path(str(value).removeprefix("file:")) if isinstance(value, str) else value
        if not path.is_absolute():
            path = self.base_dir / path
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
            raise ClientPathError(f"{value}: cannot be resolved ({type(exc).__name__})") from None
        if not any(real.is_relative_to(d) for d in self.dirs):
            raise ClientPathError(f"{value} is outside the folders API clients may use (api.media_dirs)")
        return real

    def url(self, value: str) -> str:
        """A stream or audio source: a network URL, or a file inside the media folders."""
        if is_local_file(value):
            return str(self.file(value))
        scheme = value.split(":", 1)[0].lower()
        if "://" not in value or scheme not in NETWORK_SCHEMES:
            raise ClientPathError(f"scheme '{scheme}:' is not allowed through the API (network streams: "
                                  f"{', '.join(s + '://' for s in NETWORK_SCHEMES)}; files: inside api.media_dirs)")
        return value

    def sink(self, value: str) -> str:
        """A session's output: an RTSP/RTMP URL to push to, or a file (or HLS playlist) inside the media folders."""
        if "://" in value:
            if value.split("://", 1)[0].lower() not in ("rtsp", "rtsps", "rtmp", "rtmps"):
                raise ClientPathError("out: only rtsp:// and rtmp:// outputs, or files inside api.media_dirs")
            return value
        return str(self.file(value))
