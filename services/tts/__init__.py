"""Text to speech: a backend interface (``backend``), espeak-ng (default) and CosyVoice 2 backends, the config that
picks one (``registry``), and the ``ola.tts.v1.TTSService`` servicer (``servicer``, imports grpc)."""

from services.tts.backend import BackendUnavailable, PcmChunk, SynthesisError, TTSBackend, TTSInputError, Voice
from services.tts.registry import TTSConfig, make_backend

__all__ = [
    "BackendUnavailable",
    "PcmChunk",
    "SynthesisError",
    "TTSBackend",
    "TTSConfig",
    "TTSInputError",
    "Voice",
    "make_backend",
]
