"""espeak-ng in-process, through its C library (``libespeak-ng.so.1``, installed with the espeak-ng package).

Starting the ``espeak-ng`` program costs about 11 ms per sentence on the 2-core test machine (it loads its phoneme
data each time), which is most of a short sentence's synthesis. The library loads it once per process. Its state is
global, so one synthesis runs at a time per process (a lock); the audio is the same as the program's (tested sample
for sample), 16-bit mono at the library's rate (22050 Hz).

The call runs in synchronous mode: ``espeak_Synth`` returns when the text is spoken, handing the audio to a callback
in pieces of ``buffer_ms`` as it goes. ctypes releases the GIL during the call and takes it back for each callback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

import numpy as np

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PHONEMES = 0x100  # [[phoneme]] input, as the program allows
_ENDPAUSE = 0x1000  # a pause after the text, as the program adds
_RATE = 1  # espeak_PARAMETER espeakRATE
_EE_OK = 0
_ERRORS = {-1: "internal error", 1: "buffer full", 2: "not found"}


class _Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_loaded: dict[str, LibEspeak] = {}  # the process's library, by name
_library_lock = threading.Lock()


class LibEspeakError(RuntimeError):
    """The library could not be loaded or initialised, or a call failed."""


class LibEspeak:
    """The loaded library (one per process: use :func:`load`)."""

    def __init__(self, path: str, buffer_ms: int = 20) -> None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise LibEspeakError(f"cannot load {path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, buffer_ms, None, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise LibEspeakError(f"espeak_Initialize failed ({rate}); is espeak-ng-data installed?")
        self.path = path
        self.sample_rate = int(rate)
        self._lib = lib
        self._lock = threading.Lock()  # the library's state is global: one synthesis at a time
        self._sink: Callable[[np.ndarray], None] | None = None
        self._cancel: threading.Event | None = None
        self._callback = _CALLBACK(self._on_audio)  # kept referenced: the library holds only the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples: int, _events) -> int:
        if self._cancel is not None and self._cancel.is_set():
            return 1  # stop synthesis
        if wav and num_samples > 0 and self._sink is not None:
            self._sink(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synthesize(
        self, text: str, voice: str, words_per_minute: int, sink: Callable[[np.ndarray], None], cancel: threading.Event
    ) -> bool:
        """Speak ``text``; each piece of int16 audio goes to ``sink`` as it is made. Returns False when ``cancel``
        stopped it. Raises LibEspeakError for an unknown voice or a failed call."""
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self._set_voice(voice)
            self._check(self._lib.espeak_SetParameter(_RATE, words_per_minute, 0), "rate")
            self._sink, self._cancel = sink, cancel
            try:
                err = self._lib.espeak_Synth(
                    data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _PHONEMES | _ENDPAUSE, None, None
                )
            finally:
                self._sink, self._cancel = None, None
            if cancel.is_set():
                return False
            self._check(err, "espeak_Synth")
        return True

    def _set_voice(self, voice: str) -> None:
        """As the program does: a voice by its name, else the voice of that language (``en-gb``, ``en-us+f3``)."""
        name = voice.encode("utf-8")
        if self._lib.espeak_SetVoiceByName(name) == _EE_OK:
            return
        self._check(self._lib.espeak_SetVoiceByProperties(ctypes.byref(_Voice(languages=name))), f"voice {voice!r}")

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err != _EE_OK:
            raise LibEspeakError(f"{what}: {_ERRORS.get(err, err)}")


def load(name: str = "espeak-ng") -> LibEspeak:
    """The process's library, loaded on first use. Raises LibEspeakError when it is missing or will not start."""
    with _library_lock:
        if name not in _loaded:
            _loaded[name] = LibEspeak(ctypes.util.find_library(name) or f"lib{name}.so.1")
        return _loaded[name]
