"""The ``ola.vision.v1.VisionEncoderService`` servicer (grpc.aio): images and videos to LLM-width blocks.

Each image or video becomes one ``EmbeddingBlock`` made by the pinned model version's OryxViT + vision projector
(:meth:`ola_model.model.OlaModel.encode_images` / ``encode_video``), begin / separator / newline / end vectors
included, so the LLM service splices it in unchanged. All views of all images of a request go through the ViT as one
varlen batch, together with the images of other requests that arrived while the ViT was busy
(:mod:`services.batching`); all sampled frames of a video as one batch. Outputs are cached (:mod:`services.cache`)
under the model version, the media's SHA-256, the preprocessing limits and the output dtype; a hit skips decoding
and encoding.

This module also holds :class:`EncoderServicerBase`, what the vision and audio encoder servicers share.

Construction::

    servicer = VisionEncoderServicer.from_config({"registry": {...}, "cache": {"redis_url": ...}})
    server = grpc.aio.server()
    add_to_server(server, servicer)  # + grpc.health.v1
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import grpc
import torch
from google.protobuf import duration_pb2
from pydantic import BaseModel, ConfigDict, Field

from ola_model.processing.image import ImageViews, load_image, process_image_within
from ola_model.processing.video import VideoClip, load_video
from services.batching import RequestBatcher
from services.cache import CacheConfig, CachedBlock, EncoderCache, cache_key, make_cache
from services.errors import InvalidArgument, at_field, grpc_method
from services.gen.ola.common.v1 import embedding_pb2, errors_pb2, tensor_pb2, usage_pb2
from services.gen.ola.vision.v1 import vision_pb2, vision_pb2_grpc
from services.media import MediaConfig, MediaResolver, ResolvedMedia
from services.metrics import ServiceMetrics
from services.registry import LoadedModel, ModelRegistry, ModelServiceBase, RegistryConfig
from services.wire import tensor_to_proto, torch_dtype

log = logging.getLogger(__name__)

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoderService"].full_name

_FLOAT_DTYPES = (
    tensor_pb2.DTYPE_FLOAT32,
    tensor_pb2.DTYPE_BFLOAT16,
    tensor_pb2.DTYPE_FLOAT16,
    tensor_pb2.DTYPE_FLOAT64,
)


def duration(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration of ``seconds``."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def output_dtype(value: int, native: torch.dtype, field: str = "output_dtype") -> torch.dtype:
    """The torch dtype a request asks its embeddings in: DTYPE_UNSPECIFIED means the model's own dtype."""
    if value == tensor_pb2.DTYPE_UNSPECIFIED:
        return native
    if value not in _FLOAT_DTYPES:
        name = tensor_pb2.DType.Name(value) if value in tensor_pb2.DType.values() else str(value)
        raise InvalidArgument(
            f"{name} is not a floating-point type; use one of {[tensor_pb2.DType.Name(v) for v in _FLOAT_DTYPES]}",
            field=field,
        )
    return torch_dtype(value, field)


class EncoderServicerBase(ModelServiceBase):
    """What the encoder servicers share: model versions, media resolution, the cache and block protos."""

    config_class: type[BaseModel]  # the subclass's service config (fields registry, cache, media, encode_threads)

    def __init__(
        self,
        config: BaseModel | None = None,
        *,
        registry: ModelRegistry | None = None,
        cache: EncoderCache | None = None,
        media: MediaResolver | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.config = config or self.config_class()
        super().__init__(registry or ModelRegistry(self.config.registry), metrics)
        self.cache = cache or make_cache(self.config.cache)
        self.media = media or MediaResolver(self.config.media)
        encode_threads = self.config.encode_threads
        # Encoder calls of concurrent requests take turns on a small pool: running many at once on a replica's CPU
        # or GPU only oversubscribes it. Media decoding runs in the default executor, in parallel.
        self._encode_executor = ThreadPoolExecutor(max_workers=encode_threads, thread_name_prefix="encoder")

    @classmethod
    def from_config(cls, config: BaseModel | Mapping[str, Any] | None = None):
        """Build from a config object or a plain mapping (validated)."""
        if config is not None and not isinstance(config, cls.config_class):
            config = cls.config_class.model_validate(config)
        return cls(config)

    async def _lookup(self, key: str, kind: str) -> CachedBlock | None:
        block = await self.cache.get(key)
        self.metrics.cache_lookup(self.SERVICE_LABEL, kind, block is not None)
        return block

    async def _encode(self, kind: str, fn: Any, *args: Any) -> tuple[Any, float]:
        """Run an encoder call in a worker thread (never on the event loop); returns (result, seconds)."""
        start = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._encode_executor, _inference, fn, *args)
        seconds = time.perf_counter() - start
        self.metrics.encode_seconds.labels(self.SERVICE_LABEL, kind).observe(seconds)
        return result, seconds

    @staticmethod
    def block_proto(block: torch.Tensor, modality: int, version: str, cache_hit: bool) -> embedding_pb2.EmbeddingBlock:
        return embedding_pb2.EmbeddingBlock(
            embeddings=tensor_to_proto(block),
            num_tokens=int(block.shape[0]),
            modality=modality,
            model_version=version,
            cache_hit=cache_hit,
        )


def _inference(fn: Any, *args: Any) -> Any:
    with torch.inference_mode():
        return fn(*args)


class VisionServiceConfig(BaseModel):
    """Everything a :class:`VisionEncoderServicer` is built from (validated before any model loads)."""

    model_config = ConfigDict(extra="forbid")

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    max_images: int = Field(16, ge=1, description="Most images in one EncodeImages request.")
    encode_threads: int = Field(1, ge=1, description="Encoder calls running at once (others wait their turn).")
    batch_images: int = Field(
        32, ge=1, description="Most images of concurrent requests that go through the ViT in one call."
    )


def _has_audio_track(data: bytes) -> bool:
    with av.open(io.BytesIO(data), mode="r") as container:
        return bool(container.streams.audio)


class VisionEncoderServicer(EncoderServicerBase, vision_pb2_grpc.VisionEncoderServiceServicer):
    """Serves EncodeImages / EncodeVideo for the versions of its registry.

    Args:
        config: the service config; its registry / cache / media parts are used for whatever is not passed.
        registry, cache, media, metrics: shared instances (one registry per process loads each version once).
    """

    SERVICE_NAME = SERVICE_NAME
    SERVICE_LABEL = "vision"
    config_class = VisionServiceConfig

    def __init__(self, config: VisionServiceConfig | None = None, **shared: Any) -> None:
        super().__init__(config, **shared)
        # The images of requests that arrive while the ViT is busy go through it together in its next call.
        self.image_batcher = RequestBatcher(self.config.batch_images, workers=self.config.encode_threads)

    # ------------------------------------------------------------------------------------------------ images
    @grpc_method
    async def EncodeImages(
        self, request: vision_pb2.EncodeImagesRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeImagesResponse:
        loaded = await self.registry.aget(request.model_version)
        dtype = output_dtype(request.output_dtype, loaded.model.dtype)
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("at least one image is needed", field="images")
        if count > self.config.max_images:
            raise InvalidArgument(
                f"{count} images is over the limit of {self.config.max_images} per request",
                field="images",
                value=count,
                limit=self.config.max_images,
                unit="images",
            )
        medias = await self.media.resolve_all(list(request.images), "images")
        decode_s = sum(m.fetch_seconds for m in medias)
        lim = loaded.pipeline.config.limits
        params = {"max_area": lim.max_image_area, "lowres_area": lim.lowres_area, "stride": lim.image_stride}
        keys = [cache_key(loaded.version, m.sha256, "image", params, dtype) for m in medias]
        blocks: list[CachedBlock | None] = list(await asyncio.gather(*(self._lookup(k, "image") for k in keys)))
        hits = [b is not None for b in blocks]
        missing = [i for i, b in enumerate(blocks) if b is None]
        encode_s = 0.0
        if missing:
            start = time.perf_counter()
            views = await asyncio.to_thread(self._decode_images, loaded, [(i, medias[i]) for i in missing])
            decode_s += time.perf_counter() - start
            computed, encode_s = await self.image_batcher.submit(
                (loaded.version, dtype),
                views,
                lambda batch: self._encode("image", self._encode_images, loaded, batch, dtype),
            )
            for i, tensor in zip(missing, computed, strict=True):
                blocks[i] = CachedBlock(tensor)
                await self.cache.put(keys[i], blocks[i])
        return vision_pb2.EncodeImagesResponse(
            model_version=loaded.version,
            blocks=[
                self.block_proto(b.embeddings, embedding_pb2.MODALITY_IMAGE, loaded.version, hit)
                for b, hit in zip(blocks, hits, strict=True)
                if b is not None
            ],
            timings=usage_pb2.Timings(media_decode=duration(decode_s), vision_encode=duration(encode_s)),
        )

    @staticmethod
    def _decode_images(loaded: LoadedModel, items: list[tuple[int, ResolvedMedia]]) -> list[ImageViews]:
        lim = loaded.pipeline.config.limits
        views = []
        for i, media in items:
            with at_field(f"images[{i}]"):
                views.append(process_image_within(load_image(media.data), lim))
        return views

    @staticmethod
    def _encode_images(loaded: LoadedModel, views: list[ImageViews], dtype: torch.dtype) -> list[torch.Tensor]:
        model = loaded.model
        dev = model.device
        blocks = model.encode_images([(v.lowres.to(dev), v.highres.to(dev)) for v in views])  # one varlen ViT call
        return [b.to(device="cpu", dtype=dtype) for b in blocks]

    # ------------------------------------------------------------------------------------------------- video
    @grpc_method
    async def EncodeVideo(
        self, request: vision_pb2.EncodeVideoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeVideoResponse:
        loaded = await self.registry.aget(request.model_version)
        dtype = output_dtype(request.output_dtype, loaded.model.dtype)
        lim = loaded.pipeline.config.limits
        if request.max_frames > lim.max_video_frames:
            raise InvalidArgument(
                f"{request.max_frames} frames is over the limit of {lim.max_video_frames}; request fewer",
                field="max_frames",
                value=request.max_frames,
                limit=lim.max_video_frames,
                unit="frames",
                reason=errors_pb2.ERROR_REASON_TOO_MANY_FRAMES,
            )
        max_frames = request.max_frames or lim.max_video_frames
        if not request.HasField("video"):
            raise InvalidArgument("a video is needed", field="video")
        media = await self.media.resolve(request.video, "video")
        decode_s = media.fetch_seconds
        params = {
            "max_frames": max_frames,
            "max_area": lim.video_max_area,
            "min_area": lim.video_min_area,
            "stride": lim.video_stride,
        }
        key = cache_key(loaded.version, media.sha256, "video", params, dtype)
        block = await self._lookup(key, "video")
        hit, encode_s = block is not None, 0.0
        if block is None:
            start = time.perf_counter()
            clip, has_audio = await asyncio.to_thread(self._decode_video, loaded, media, max_frames)
            decode_s += time.perf_counter() - start
            tensor, encode_s = await self._encode("video", self._encode_video, loaded, clip.frames, dtype)
            width, height = clip.frame_size
            times = [i / clip.fps for i in clip.frame_indices] if clip.fps else []
            meta = {
                "num_frames": clip.num_frames,
                "frame_times_s": times,
                "frame_width": width,
                "frame_height": height,
                "has_audio_track": has_audio,
            }
            block = CachedBlock(tensor, meta)
            await self.cache.put(key, block)
        meta = block.meta
        return vision_pb2.EncodeVideoResponse(
            model_version=loaded.version,
            block=self.block_proto(block.embeddings, embedding_pb2.MODALITY_VIDEO, loaded.version, hit),
            num_frames=meta["num_frames"],
            frame_times_s=meta["frame_times_s"],
            frame_width=meta["frame_width"],
            frame_height=meta["frame_height"],
            has_audio_track=meta["has_audio_track"],
            timings=usage_pb2.Timings(media_decode=duration(decode_s), vision_encode=duration(encode_s)),
        )

    @staticmethod
    def _decode_video(loaded: LoadedModel, media: ResolvedMedia, max_frames: int) -> tuple[VideoClip, bool]:
        lim = loaded.pipeline.config.limits
        with at_field("video"):
            clip = load_video(
                media.data,
                max_frames=max_frames,
                frame_limit=lim.max_video_frames,
                max_area=lim.video_max_area,
                min_area=lim.video_min_area,
                stride=lim.video_stride,
                with_audio=False,  # the audio track is the audio encoder's (the gateway sends it there)
            )
            return clip, _has_audio_track(media.data)

    @staticmethod
    def _encode_video(loaded: LoadedModel, frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        model = loaded.model
        return model.encode_video(frames.to(model.device)).to(device="cpu", dtype=dtype)  # all frames, one batch


def add_to_server(server: grpc.aio.Server, servicer: VisionEncoderServicer, health_servicer: Any = None) -> Any:
    """Register the vision service and its grpc.health.v1 status on ``server``; returns the health servicer."""
    vision_pb2_grpc.add_VisionEncoderServiceServicer_to_server(servicer, server)
    return servicer.attach_health(server, health_servicer)
