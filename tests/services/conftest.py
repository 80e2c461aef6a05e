"""Fixtures of the model-service tests: a tiny checkpoint, real servers on loopback, generated media.

- ``tiny_checkpoint``: the seeded tiny model of ``tests/conftest.py`` saved in the Ola layout with its tokenizer, so
  the services load it through the registry and the tests can compare against the model itself;
- ``redis_url`` and ``s3`` (real servers on loopback) come from ``tests/conftest.py``;
- ``aio``: one background event loop running every grpc.aio server of the session; tests talk to them with plain
  synchronous gRPC channels over loopback, which also lets them cancel calls and run calls from several threads.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest


# ------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tok) -> Path:
    from ola_model import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("services") / "tiny-ckpt", tokenizer=tiny_tok)


VERSION = "tiny@1"


@pytest.fixture(scope="session")
def registry(tiny_checkpoint: Path):
    """One registry for every servicer of the session: the checkpoint loads once."""
    from services.registry import ModelRegistry, ModelSource, RegistryConfig

    return ModelRegistry(
        RegistryConfig(versions={VERSION: ModelSource(checkpoint=tiny_checkpoint)}, default_version=VERSION)
    )


class AioLoop:
    """A background event loop thread hosting grpc.aio servers (and anything else async)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aio-loop", daemon=True)
        self.thread.start()
        self.servers: list[grpc.aio.Server] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, *registrations: Callable[[grpc.aio.Server], Any]) -> int:
        """Start a grpc.aio server on a free loopback port with ``registrations`` applied; returns the port."""

        async def start() -> int:
            server = grpc.aio.server()
            for register in registrations:
                register(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)
            return port

        return self.run(start())

    def close(self) -> None:
        async def stop() -> None:
            await asyncio.gather(*(s.stop(grace=None) for s in self.servers))

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def aio() -> Iterator[AioLoop]:
    loop = AioLoop()
    yield loop
    loop.close()


# ------------------------------------------------------------------------------------------------ media
def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def mp4_bytes(frames: int = 8, size: tuple[int, int] = (64, 48), audio_seconds: float = 0.0) -> bytes:
    """A small h264 (+ aac when ``audio_seconds``) mp4 with a moving white bar."""
    import av

    width, height = size
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = out.add_stream("h264", rate=10)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=16000) if audio_seconds else None
        for i in range(frames):
            arr = np.zeros((height, width, 3), np.uint8)
            arr[:, (i * 6) % width : (i * 6) % width + 12] = 255
            for pkt in video.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in video.encode():
            out.mux(pkt)
        if audio is not None:
            n = int(audio_seconds * 16000)
            samples = (0.3 * np.sin(2 * math.pi * 300 * np.arange(n) / 16000)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for pkt in audio.encode(frame):
                out.mux(pkt)
            for pkt in audio.encode():
                out.mux(pkt)
    return buf.getvalue()


@dataclass(frozen=True)
class Media:
    red_png: bytes
    blue_png: bytes
    corrupt_png: bytes
    tone_wav: bytes
    clip_mp4: bytes  # 8 frames 64x48 with a 1 s audio track
    silent_mp4: bytes  # 6 frames, no audio track


@pytest.fixture(scope="session")
def media() -> Media:
    red = png_bytes((64, 48), (200, 30, 30))
    return Media(
        red_png=red,
        blue_png=png_bytes((40, 40), (30, 30, 200)),
        corrupt_png=red[: len(red) // 2],  # a truncated PNG
        tone_wav=wav_bytes(),
        clip_mp4=mp4_bytes(8, audio_seconds=1.0),
        silent_mp4=mp4_bytes(6),
    )


@pytest.fixture(scope="session")
def make_media() -> Any:
    """The media builders, for tests that need their own variants (test modules cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(png=png_bytes, wav=wav_bytes, mp4=mp4_bytes)


@pytest.fixture(scope="session")
def version() -> str:
    """The model version name the session's registry serves (also its default)."""
    return VERSION
