"""End-to-end local inference: media in, streamed text out (the shape of Ola's ``infer.py``, fixed and batched).

:class:`OlaPipeline` ties the tokenizer, the weight-free processing and the model together. It validates every input
and every limit *before* running an encoder: corrupt media, too many frames, audio over 25 chunks or a prompt over the
context are clear errors, never a silently dropped question.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ola_model.config import OlaConfig
from ola_model.errors import InputError, LimitError
from ola_model.generation import SamplingParams, generate_ids, stream_text
from ola_model.model import OlaModel, build_model
from ola_model.processing.audio import AudioFeatures, load_audio, process_audio
from ola_model.processing.image import ImageViews, load_image, process_image_within
from ola_model.processing.video import VideoClip, load_video
from ola_model.prompt import Message, assemble_embeddings, chatml, prompt_length, tokenize_prompt, user_content
from ola_model.tokenizer import load_tokenizer, stop_token_ids, tiny_tokenizer
from ola_model.tokens import audio_num_tokens, view_num_tokens

log = logging.getLogger(__name__)

MediaSource = str | Path | bytes


@dataclass
class OlaRequest:
    """One user turn with its media. ``history`` holds earlier text turns of the conversation."""

    question: str
    images: Sequence[MediaSource] = ()
    video: MediaSource | None = None
    audio: MediaSource | None = None
    use_video_audio: bool = True  # a video's own audio track goes to the speech encoders
    spoken_question: bool = False  # the audio is the question about the image / video
    max_video_frames: int | None = None  # None: the config's limit (64)
    history: Sequence[Message] = ()


@dataclass
class PreparedMedia:
    """Decoded, preprocessed media of one request (no model run yet)."""

    images: list[ImageViews] = field(default_factory=list)
    video: VideoClip | None = None
    audio: AudioFeatures | None = None


@dataclass
class PreparedPrompt:
    """A prompt ready for decoding: embeddings (L, C) and how many positions each modality takes."""

    embeds: torch.Tensor
    token_ids: list[int]
    num_tokens: dict[str, int]


class OlaPipeline:
    """Local Ola inference: ``prepare`` a request, then ``stream`` or ``generate`` its answer."""

    def __init__(self, model: OlaModel, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: OlaConfig = model.config
        self.stop_ids = stop_token_ids(tokenizer)
        if len(tokenizer) > self.config.llm.vocab_size:
            raise InputError(f"tokenizer has {len(tokenizer)} tokens but the model only {self.config.llm.vocab_size}")

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, progress: bool = False
    ) -> OlaPipeline:
        from ola_model.checkpoint.ola_format import load_checkpoint

        model = load_checkpoint(path, device=device, dtype=dtype, progress=progress)
        return cls(model, load_tokenizer(path))

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, device: str = "cpu") -> OlaPipeline:
        """A randomly initialised model of a preset (tiny: with the shipped tokenizer). For tests and demos."""
        if name != "tiny":
            raise InputError(f"only the tiny preset ships a tokenizer; load {name!r} from a checkpoint directory")
        return cls(build_model(OlaConfig.from_name(name), device=device, seed=seed), tiny_tokenizer())

    # ---------------------------------------------------------------------------------------------- preparation
    def load_media(self, request: OlaRequest) -> PreparedMedia:
        """Decode and preprocess every input, checking the limits; raises before any model work."""
        lim = self.config.limits
        if request.video is not None and request.images:
            raise InputError("a request takes images or one video, not both")
        media = PreparedMedia()
        for img in request.images:
            media.images.append(process_image_within(load_image(img), lim))
        wav = None
        if request.video is not None:
            frames = request.max_video_frames or lim.max_video_frames
            media.video = load_video(
                request.video,
                max_frames=frames,
                frame_limit=lim.max_video_frames,
                max_area=lim.video_max_area,
                min_area=lim.video_min_area,
                stride=lim.video_stride,
                with_audio=request.use_video_audio and request.audio is None,
            )
            wav = media.video.audio
        if request.audio is not None:
            wav = load_audio(request.audio)
        if wav is not None:
            media.audio = process_audio(wav, max_chunks=lim.max_audio_chunks)
        if request.spoken_question and media.audio is None:
            raise InputError("spoken_question needs an audio input")
        return media

    def prompt_ids(self, request: OlaRequest, media: PreparedMedia) -> list[int]:
        content = user_content(
            request.question,
            num_images=len(media.images),
            video=media.video is not None,
            audio=media.audio is not None,
            spoken_question=request.spoken_question,
        )
        text = chatml([*request.history, Message("user", content)])
        return tokenize_prompt(text, self.tokenizer)

    def prepare(self, request: OlaRequest, reserve: int = 0) -> PreparedPrompt:
        """Request -> embeddings, with ``reserve`` positions of the context kept for the answer."""
        media = self.load_media(request)
        ids = self.prompt_ids(request, media)
        # Check the context before encoding anything (block sizes follow from the media geometry).
        patch, pool = self.config.vision.patch_size, self.config.projector.pool_window
        sizes = {
            "image": sum(
                3 + sum(view_num_tokens(v.shape[2], v.shape[1], patch, pool) for v in (im.lowres, im.highres))
                for im in media.images
            ),
            "video": 0,
            "audio": audio_num_tokens(media.audio.num_samples) if media.audio else 0,
        }
        if media.video is not None:
            T, _, H, W = media.video.frames.shape
            sizes["video"] = 2 + T * (view_num_tokens(W, H, patch, pool) + 1)
        n_blocks = len(media.images) + (media.video is not None) + (media.audio is not None)
        sizes["text"] = len(ids) - n_blocks
        total = sum(sizes.values())
        max_context = self.config.limits.max_context
        if total + reserve > max_context:
            raise LimitError(
                "prompt length in tokens" + (f" (+ {reserve} reserved for the answer)" if reserve else ""),
                total + reserve,
                max_context,
                f"image {sizes['image']}, video {sizes['video']}, audio {sizes['audio']}, text {sizes['text']}; "
                "use fewer video frames, shorter audio or fewer images",
            )
        model = self.model
        with torch.inference_mode():
            vision_blocks: list[torch.Tensor] = []
            dev = model.device
            if media.images:
                vision_blocks = model.encode_images([(im.lowres.to(dev), im.highres.to(dev)) for im in media.images])
            if media.video is not None:
                vision_blocks = [model.encode_video(media.video.frames.to(dev))]
            speech_blocks = []
            if media.audio is not None:
                speech_blocks = [model.encode_audio(media.audio.mel.to(dev), media.audio.wav_chunks.to(dev))]
            embeds = assemble_embeddings(
                ids, vision_blocks, speech_blocks, lambda t: model.embed_tokens(t.to(dev)), max_context, reserve
            )
        lengths = [b.shape[0] for b in vision_blocks + speech_blocks]
        assert embeds.shape[0] == prompt_length(ids, lengths) == total, (embeds.shape, total)
        return PreparedPrompt(embeds=embeds, token_ids=ids, num_tokens=sizes)

    # ------------------------------------------------------------------------------------------------ decoding
    def stream(self, request: OlaRequest, params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Stream the answer as text deltas."""
        prompt = self.prepare(request, reserve=params.max_new_tokens)
        yield from stream_text(
            self.model, prompt.embeds, self.tokenizer, params, self.stop_ids, self.config.limits.max_context
        )

    def generate(self, requests: Sequence[OlaRequest], params: SamplingParams = SamplingParams()) -> list[str]:
        """Answer several requests as one batch."""
        prompts = [self.prepare(r, reserve=params.max_new_tokens).embeds for r in requests]
        ids = generate_ids(self.model, prompts, params, self.stop_ids, self.config.limits.max_context)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
