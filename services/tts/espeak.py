"""The default TTS backend: espeak-ng (real, if robotic, speech in about 130 languages).

Two engines speak the same voices. ``library`` (the default where libespeak-ng loads) synthesises in-process through
the C library (:mod:`services.tts.libespeak`): the first audio of a sentence comes in well under a millisecond instead
of the ~10 ms it takes the ``espeak-ng`` program to start, one synthesis at a time per process. ``process`` runs the
program per request, so requests synthesise in parallel processes. The program lists the voices for both.

``espeak-ng --stdout`` writes a WAV stream (22050 Hz, 16-bit mono) whose header sizes are placeholders, since it
is written before the audio; the PCM is read as it comes, resampled to the requested rate and cut into chunks. The
text goes through stdin (never argv, so a text starting with ``-`` is not an option), as UTF-8.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Literal

import numpy as np

from services.tts.backend import (
    AUTO_VOICE,
    BackendUnavailable,
    PcmChunk,
    PcmChunker,
    SynthesisError,
    TTSBackend,
    TTSInputError,
    Voice,
)

log = logging.getLogger(__name__)

Engine = Literal["auto", "library", "process"]
NORMAL_WPM = 175  # espeak-ng's default rate; speed 1.0
AUTO_VOICES = {"zh": "cmn", "en": "en-us"}  # text_language() -> voice
_READ_BYTES = 8192
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes of a WAV written before its length was known
_OTHER_LANGUAGE = re.compile(r"\(([^\s()]+)\s+(\d+)\)")


class EspeakBackend(TTSBackend):
    """Speech with espeak-ng. Voices are espeak-ng language ids (``en-us``, ``cmn``, ...), optionally with a
    variant (``en-us+f3``); language aliases such as ``zh`` or ``en`` resolve to espeak-ng's preferred voice.

    ``engine``: ``library`` (in-process libespeak-ng; BackendUnavailable when it does not load), ``process`` (the
    ``espeak-ng`` program per request) or ``auto`` (the library where it loads, else the program)."""

    name = "espeak"

    def __init__(
        self,
        sample_rate: int = 24000,
        default_voice: str = AUTO_VOICE,
        chunk_ms: int = 100,
        max_text_chars: int = 2000,
        executable: str = "espeak-ng",
        timeout_s: float = 60.0,
        engine: Engine = "auto",
    ) -> None:
        super().__init__(sample_rate, default_voice, chunk_ms, max_text_chars)
        path = shutil.which(executable)
        if path is None:
            raise BackendUnavailable(
                self.name,
                f"the {executable!r} executable is not on PATH; install it with `apt-get install espeak-ng` "
                "(scripts/install-system.sh does)",
            )
        self.executable = path
        self.timeout_s = timeout_s
        self.library = None
        if engine not in ("auto", "library", "process"):
            raise ValueError(f"engine must be auto, library or process, got {engine!r}")
        if engine != "process":
            from services.tts.libespeak import LibEspeakError, load

            try:
                self.library = load()
            except LibEspeakError as e:
                if engine == "library":
                    raise BackendUnavailable(
                        self.name, f"{e}; install libespeak-ng1 (scripts/install-system.sh)"
                    ) from None
                log.info("espeak-ng runs as a program per request: %s", e)
        self.engine = "library" if self.library is not None else "process"
        self._voices, self._aliases = _parse_voices(self._run_listing("--voices"))
        variant_files = (line.split()[4].rsplit("/", 1)[-1] for line in self._run_listing("--voices=variant"))
        self._variants = {name.lower(): name for name in variant_files}  # espeak-ng's variant names are case-sensitive
        if not self._voices:
            raise BackendUnavailable(self.name, f"{path} --voices lists no voices (is espeak-ng-data installed?)")
        if default_voice.lower() != AUTO_VOICE:
            try:
                self.default_voice = self._validate_voice(default_voice)
            except TTSInputError as e:
                raise ValueError(f"default_voice: {e}") from None

    def _run_listing(self, option: str) -> list[str]:
        try:
            r = subprocess.run(
                [self.executable, option], capture_output=True, text=True, timeout=self.timeout_s, check=True
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise BackendUnavailable(self.name, f"`{self.executable} {option}` failed: {e}") from e
        return [line for line in r.stdout.splitlines()[1:] if len(line.split()) >= 5]

    def voices(self) -> list[Voice]:
        return sorted(self._voices.values(), key=lambda v: v.id)

    def _validate_voice(self, voice: str) -> str:
        base, _, variant = voice.strip().lower().partition("+")
        base = self._aliases.get(base, base)
        if base not in self._voices:
            raise TTSInputError(
                "voice", f"{voice!r} is not an espeak-ng voice; ListVoices lists them (en-us, cmn, ...)"
            )
        if variant and variant not in self._variants:
            raise TTSInputError("voice", f"{voice!r} has an unknown variant {variant!r} (try en-us+f3)")
        return f"{base}+{self._variants[variant]}" if variant else base

    def _auto_voice(self, language: str) -> str:
        return self._validate_voice(AUTO_VOICES.get(language, AUTO_VOICES["en"]))

    def _synthesize(self, text: str, voice: str, speed: float, sample_rate: int) -> Iterator[PcmChunk]:
        if self.library is not None:
            return self._synthesize_in_process(text, voice, speed, sample_rate)
        return self._synthesize_with_program(text, voice, speed, sample_rate)

    def _synthesize_in_process(self, text: str, voice: str, speed: float, sample_rate: int) -> Iterator[PcmChunk]:
        """The library speaks in a thread of its own; its pieces of audio are chunked here as they come."""
        from services.tts.libespeak import LibEspeakError

        pieces: queue.SimpleQueue = queue.SimpleQueue()  # int16 arrays, then None or the error
        cancel = threading.Event()

        def speak() -> None:
            try:
                self.library.synthesize(text, voice, round(NORMAL_WPM * speed), pieces.put, cancel)
                pieces.put(None)
            except LibEspeakError as e:
                pieces.put(SynthesisError(f"libespeak-ng: {e}"))
            except BaseException as e:  # handed to the consumer, which raises it
                pieces.put(e)

        worker = threading.Thread(target=speak, name="espeak", daemon=True)
        worker.start()
        chunker = PcmChunker(self.library.sample_rate, sample_rate, self.chunk_ms)
        try:
            while True:
                try:
                    piece = pieces.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise SynthesisError(f"libespeak-ng made no audio for {self.timeout_s} s") from None
                if piece is None:
                    break
                if isinstance(piece, BaseException):
                    raise piece
                yield from chunker.push(piece)
            yield from chunker.finish()
        finally:
            cancel.set()  # a consumer that stopped early (cancelled request) stops the synthesis at its next piece

    def _synthesize_with_program(self, text: str, voice: str, speed: float, sample_rate: int) -> Iterator[PcmChunk]:
        wpm = round(NORMAL_WPM * speed)
        cmd = [self.executable, "-b", "1", "-v", voice, "-s", str(wpm), "--stdout", "--stdin"]
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
            # Feed stdin from a thread: espeak-ng may start writing audio before it has read all the text.
            feeder = threading.Thread(target=_feed, args=(proc.stdin, text.encode("utf-8")), daemon=True)
            feeder.start()
            timer = threading.Timer(self.timeout_s, proc.kill)
            timer.start()
            try:
                assert proc.stdout is not None
                try:
                    rate = _read_wav_header(proc.stdout)
                except SynthesisError as e:
                    proc.wait()
                    raise SynthesisError(f"{e}; espeak-ng said: {_tail(stderr)}") from None
                chunker = PcmChunker(rate, sample_rate, self.chunk_ms)
                carry = b""
                while block := proc.stdout.read1(_READ_BYTES):
                    carry += block
                    usable = len(carry) // 2 * 2
                    yield from chunker.push(np.frombuffer(carry[:usable], dtype="<i2"))
                    carry = carry[usable:]
                if proc.wait() != 0:
                    raise SynthesisError(f"espeak-ng exited with status {proc.returncode}: {_tail(stderr)}")
                yield from chunker.finish()
            finally:
                timer.cancel()
                if proc.poll() is None:  # the consumer stopped early (cancelled request): stop espeak-ng now
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                feeder.join(timeout=1.0)


def _feed(stream: IO[bytes] | None, data: bytes) -> None:
    assert stream is not None
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, ValueError, OSError):  # the process was killed before reading everything
        pass


def _tail(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read()[-500:].decode("utf-8", "replace").strip() or "(no message)"


def _read_exact(stream: IO[bytes], n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        block = stream.read(n - len(data))
        if not block:
            raise SynthesisError(f"espeak-ng's WAV output ended inside the {what} ({len(data)} of {n} bytes)")
        data += block
    return data


def _read_wav_header(stream: IO[bytes]) -> int:
    """Read a RIFF/WAVE header up to the start of the PCM data; returns the sample rate.

    Accepts 16-bit PCM mono only (what espeak-ng writes) and ignores the RIFF and data sizes, which a streamed WAV
    leaves as 0, 0xFFFFFFFF or a large placeholder: the data runs to the end of the stream.
    """
    riff = _read_exact(stream, 12, "RIFF header")
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise SynthesisError(f"espeak-ng's output is not a WAV stream (starts with {riff[:12]!r})")
    rate = None
    while True:
        chunk_id, size = struct.unpack("<4sI", _read_exact(stream, 8, "chunk header"))
        if chunk_id == b"data":
            if rate is None:
                raise SynthesisError("espeak-ng's WAV stream has a data chunk before its fmt chunk")
            return rate
        if size in _UNKNOWN_SIZES or size > 1 << 20:
            raise SynthesisError(f"espeak-ng's WAV stream has a {chunk_id!r} chunk of implausible size {size}")
        body = _read_exact(stream, size + (size & 1), f"{chunk_id!r} chunk")
        if chunk_id == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if fmt not in (1, 0xFFFE) or channels != 1 or bits != 16:
                raise SynthesisError(
                    f"espeak-ng wrote format {fmt} with {channels} channels of {bits} bits; expected 16-bit PCM mono"
                )


def _parse_voices(lines: list[str]) -> tuple[dict[str, Voice], dict[str, str]]:
    """Parse ``espeak-ng --voices``: ``Pty Language Age/Gender VoiceName File (alias priority)...``.

    Returns the voices by id and the aliases (``zh`` -> ``cmn``: the voice with the best, lowest, priority).
    """
    voices: dict[str, Voice] = {}
    best: dict[str, tuple[int, str]] = {}
    for line in lines:
        _, language, age_gender, name, _file, *rest = line.split(maxsplit=5)
        vid = language.lower()
        if vid in voices:
            continue  # a second voice file for the same language (yue): the first is what `-v yue` picks
        others = _OTHER_LANGUAGE.findall(rest[0]) if rest else []
        gender = {"M": "male", "F": "female"}.get(age_gender.rpartition("/")[2], "")
        voices[vid] = Voice(vid, name.replace("_", " ").strip(), (vid, *(o.lower() for o, _ in others)), gender)
        for alias, priority in others:
            alias = alias.lower()
            if alias not in best or int(priority) < best[alias][0]:
                best[alias] = (int(priority), vid)
    aliases = {alias: vid for alias, (_, vid) in best.items() if alias not in voices}
    return voices, aliases
