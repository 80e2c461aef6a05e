"""Packet-level decoding shared by the audio and video readers: corrupt packets are skipped and counted."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import av

logger = logging.getLogger(__name__)


def exception_reason(exc: Exception) -> str:
    """FFmpeg's message without PyAV's errno prefix."""
    return getattr(exc, "strerror", None) or str(exc)


class TolerantDecoder:
    """Yields the decoded frames of one stream, skipping packets that fail to decode (e.g. a truncated file).

    ``bad_packets`` counts the skipped packets; errors of the container itself still propagate to the caller.
    """

    def __init__(self, kind: str, what: str) -> None:
        self.kind = kind
        self.what = what
        self.bad_packets = 0

    def frames(self, container: av.container.InputContainer, stream: av.stream.Stream) -> Iterator[av.frame.Frame]:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except (av.FFmpegError, ValueError) as exc:
                self.bad_packets += 1
                logger.debug("%s %s: skipping undecodable packet (%s)", self.kind, self.what, exception_reason(exc))
                continue
            yield from decoded
