"""Serving benchmarks, each side by side against its baseline in one run, reported as ratios.

1. Throughput: N concurrent chats through the services (gateway -> encoders -> LLM with continuous batching) vs the
   same requests answered one at a time by ``ola_model`` local generation (the shape of Ola's ``infer.py``), at
   N = 1, 4, 8, 16; chats with one fresh 320×240 image each, then text chats. Same weights (one model version),
   same greedy decoding, same number of new tokens.
2. Encoder cache: EncodeImages / EncodeVideo of a repeated input, hit vs miss.
3. Time to first audio: sentence-wise speech while the LLM goes on vs speaking the whole answer after it finishes,
   on answers of 3, 4, 6 and 8 sentences. The answers come from "talker" model versions: tiny models whose LLM is
   trained here (seconds each) to answer any question with a fixed paragraph of that many sentences, since the
   synthetic-data demo model answers in a word or a phrase. Only the answer's length matters to this comparison;
   the path (gateway, LLM service, sentence cutting, TTS) is the real one.
4. Vision replicas: an image-heavy load (2 images per chat, 8-token answers) through a gateway that balances over
   1, then 2 vision encoder replicas, the LLM service untouched (the same process throughout). The images are
   1000×750 JPEG photos (smooth content). Each vision replica is pinned to one CPU, as a replica owns the
   device it is given (``--no-pin`` lets them float).

Everything runs on this machine over real gRPC on loopback, real espeak-ng, with every service in its own process
(the TTS service too) as Ray Serve runs them (a replica is a process; model processes use one torch thread) and the
clients in processes of their own. Run: ``.venv/bin/python -m bench.serving [--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import math
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench._common import format_table, machine_info, write_json
from ola_model.engine import LLMEngine
from ola_model.generation import generate_ids
from services.gen.ola.omni.v1 import omni_pb2_grpc
from services.gen.ola.vision.v1 import vision_pb2_grpc

VERSION = "tiny"
SENTENCES = (
    "The picture shows three red circles on the left.",
    "A blue square sits in the middle of the scene.",
    "Two green triangles point upward on the right.",
    "The background is a plain light gray.",
    "A thin black line runs along the bottom edge.",
    "The circles are about the same size as the square.",
    "Nothing in the scene overlaps anything else.",
    "Overall it looks like a simple shape puzzle.",
)


def talker_version(sentences: int) -> str:
    return f"talker-{sentences}"


def train_talker(out_dir, sentences: int, steps: int = 120, seed: int = 0):
    """Save a tiny checkpoint whose LLM answers every chat prompt with the first ``sentences`` of ``SENTENCES``
    (trained here, seconds)."""
    import torch
    import torch.nn.functional as F

    from ola_model import OlaConfig, build_model, save_checkpoint
    from ola_model.prompt import SYSTEM_PROMPT
    from ola_model.tokenizer import tiny_tokenizer

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = build_model(OlaConfig.from_name("tiny"), seed=seed)
    answer = tok(" ".join(SENTENCES[:sentences]) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.AdamW(model.llm.parameters(), lr=3e-3)
    for step in range(steps):
        question = f"Tell me about picture number {step % 7}. Describe it in several sentences."
        prompt = (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + answer])
        labels = torch.tensor([[-100] * len(ids) + answer])
        logits = model.llm(input_ids=x).logits
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(model, out_dir, tokenizer=tok)


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mp4(frames: int, size: tuple[int, int]) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


_RUNS = itertools.count(1)
LOADS = ("closed", "bursts")  # how a throughput run keeps N chats in flight (_chat_load)
KINDS = {"image": 1, "text": 0}  # throughput chats: images per chat


def fresh_seed() -> int:
    """A seed no earlier load of this process used: chat ``i``'s image ``j`` is drawn from ``seed + 100 * i + j``
    (``i`` < 1000, ``j`` < 100), so images never repeat across loads and never hit the encoder cache."""
    return 100_000 * next(_RUNS)


_OPTIONS = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]


def _versions(talkers: dict[str, str] | None) -> dict[str, Any]:
    from services.registry import ModelSource

    versions = {VERSION: ModelSource(preset="tiny", seed=0)}
    for name, path in (talkers or {}).items():
        versions[name] = ModelSource(checkpoint=path)
    return versions


def _serve_role(role: str, args: dict[str, Any], conn) -> None:
    """A child process serving one role on a loopback port (sent back through ``conn``) until it is terminated.

    ``llm``: the LLM service (and the audio encoder); ``vision``: one vision encoder replica; ``tts``: the TTS service
    (espeak-ng); ``gateway``: the omni gateway. The ``llm`` role answers ``"stats"`` on ``conn`` with its largest batch
    since the last question. Model processes run torch on one thread: one replica per CPU.
    """
    import torch

    torch.set_num_threads(1)
    if args.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args["cpu"]})
    if role == "tts":
        from services.tts.servicer import TTSServicer, build_server

        tts_server, tts_port = build_server(TTSServicer.from_config({"sample_rate": 16000}))
        conn.send(f"127.0.0.1:{tts_port}")
        tts_server.wait_for_termination()
        return

    async def serve() -> None:
        from services.registry import ModelRegistry, RegistryConfig

        server = grpc.aio.server(options=_OPTIONS)
        if role in ("llm", "vision"):
            registry = ModelRegistry(RegistryConfig(versions=_versions(args.get("talkers")), default_version=VERSION))
        if role == "llm":
            from services.audio import AudioEncoderServicer
            from services.audio import add_to_server as add_audio
            from services.llm import LLMServiceConfig, LLMServicer
            from services.llm import add_to_server as add_llm

            llm = LLMServicer(
                LLMServiceConfig(max_batch=args["max_batch"], stream_interval_ms=args["stream_interval_ms"]),
                registry=registry,
            )
            add_audio(server, AudioEncoderServicer(registry=registry), add_llm(server, llm))

            def stats() -> None:
                while conn.recv() == "stats":
                    conn.send({"max_batch": llm.max_batch_size})
                    llm.max_batch_size = 0

            threading.Thread(target=stats, daemon=True).start()
        elif role == "vision":
            from services.vision import VisionEncoderServicer
            from services.vision import add_to_server as add_vision

            add_vision(server, VisionEncoderServicer(registry=registry))
        else:
            from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer

            backends = GrpcBackends(args["vision"], args["llm"], args["llm"], args["tts"])
            gateway = OmniGateway(backends, GatewayConfig(default_model_version=VERSION))
            omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gateway), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(f"127.0.0.1:{port}")
        await server.wait_for_termination()

    asyncio.run(serve())


def _photo(seed: int, size: tuple[int, int]) -> bytes:
    """A JPEG of smooth random content (an upscaled 8×6 noise image), sized like a phone photo's preview."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chat_load(
    target: str,
    n: int,
    seed: int,
    images: int,
    new_tokens: int,
    photos: bool,
    conn,
    rounds: int = 1,
    load: str = "closed",
) -> None:
    """A client process: ``n * rounds`` chats with ``images`` fresh images each (320×240 noise PNGs, or 1000×750
    JPEG photos), ``n`` at a time; sends (completion tokens, seconds of all chats, encoder cache hits).

    ``load="closed"``: ``n`` clients, each starting its next chat as soon as its last one ends, so ``n`` chats are in
    flight until the last ones finish (concurrency as serving benchmarks define it). ``load="bursts"``: ``rounds``
    bursts of ``n`` chats, each burst waiting for its slowest chat before the next starts."""
    from services.gen.ola.common.v1 import media_pb2
    from services.gen.ola.omni.v1 import omni_pb2

    stub = omni_pb2_grpc.OmniServiceStub(grpc.insecure_channel(target, options=_OPTIONS))
    make = (lambda k: _photo(k, (1000, 750))) if photos else (lambda k: _png(k, (320, 240)))
    pictures = [[make(seed + 100 * i + j) for j in range(images)] for i in range(n * rounds)]

    def chat(i: int) -> int:
        req = omni_pb2.ChatRequest(
            text=_question(i),
            images=[media_pb2.MediaRef(inline_data=p) for p in pictures[i]],
            sampling=_sampling(new_tokens),
        )
        for event in stub.Chat(req, timeout=600):
            if event.HasField("usage"):
                cached[i] = event.usage.cached_blocks
                return event.usage.completion_tokens
        return 0

    total = n * rounds
    if total > 1000:
        raise ValueError(f"{total} chats in one load: images are drawn from seed + 100 * chat, at most 1000 chats")
    cached = [0] * total  # encoder blocks served from the cache, per chat
    next_chat = iter(range(total))
    lock = threading.Lock()

    def client(_: int) -> int:
        tokens = 0
        while True:
            with lock:
                i = next(next_chat, None)
            if i is None:
                return tokens
            tokens += chat(i)

    tokens = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        if load == "closed":
            tokens = sum(pool.map(client, range(n)))
        elif load != "bursts":
            raise ValueError(f"unknown load {load!r}; known: {', '.join(LOADS)}")
        else:
            for r in range(rounds):
                tokens += sum(pool.map(chat, range(r * n, (r + 1) * n)))
    conn.send((tokens, time.perf_counter() - start, sum(cached)))


def _question(i: int) -> str:
    return f"Question {i}: what do you see?"


class Stack:
    """The services as separate processes on loopback, as Ray Serve runs them (a replica is a process): the LLM
    service (with the audio encoder), ``vision_replicas`` vision encoder replicas, the TTS service, and one gateway
    per entry of ``gateways`` (how many vision replicas it balances over, round robin). Clients are processes of their
    own (:meth:`load`)."""

    def __init__(
        self,
        max_batch: int = 16,
        talkers: dict[str, str] | None = None,
        stream_interval_ms: float = 20.0,
        vision_replicas: int = 1,
        gateways: tuple[int, ...] = (1,),
        pin_vision: bool = False,
    ) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        args = {"max_batch": max_batch, "stream_interval_ms": stream_interval_ms, "talkers": talkers}
        self.llm_target, self._llm_conn = self._start("llm", args)
        cpus = sorted(os.sched_getaffinity(0)) if pin_vision and hasattr(os, "sched_getaffinity") else []
        self.vision_targets = [
            self._start("vision", {**args, "cpu": cpus[k % len(cpus)] if cpus else None})[0]
            for k in range(vision_replicas)
        ]
        self.tts_target, _ = self._start("tts", {})
        self.gateway_targets: dict[int, str] = {}
        for replicas in gateways:
            vision = ",".join(self.vision_targets[:replicas])
            self.gateway_targets[replicas], _ = self._start(
                "gateway", {"vision": vision, "llm": self.llm_target, "tts": self.tts_target}
            )
        self.omni = omni_pb2_grpc.OmniServiceStub(
            grpc.insecure_channel(self.gateway_targets[gateways[0]], options=_OPTIONS)
        )
        self.vision_stub = vision_pb2_grpc.VisionEncoderServiceStub(
            grpc.insecure_channel(self.vision_targets[0], options=_OPTIONS)
        )
        from services.registry import ModelRegistry, RegistryConfig

        registry = ModelRegistry(RegistryConfig(versions=_versions(None), default_version=VERSION))
        self.pipeline = registry.get(VERSION).pipeline  # the baseline's: the same weights as the services'

    def _start(self, role: str, args: dict[str, Any]) -> tuple[str, Any]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve_role, args=(role, args, child), daemon=True)
        proc.start()
        self._procs.append(proc)
        if not parent.poll(300):
            raise RuntimeError(f"the {role} process did not start (exit code {proc.exitcode})")
        return parent.recv(), parent

    def llm_stats(self) -> dict[str, Any]:
        self._llm_conn.send("stats")
        return self._llm_conn.recv()

    def load(
        self,
        n: int,
        seed: int,
        images: int,
        new_tokens: int,
        gateway: int | None = None,
        photos: bool = False,
        rounds: int = 1,
        load: str = "closed",
    ) -> tuple[int, float]:
        """``n * rounds`` chats, ``n`` at a time (``load``: see :func:`_chat_load`), from a client process;
        (completion tokens, seconds). Every image must be new to the encoder cache (RuntimeError otherwise): a
        load with cache hits would not measure encoding."""
        target = self.gateway_targets[gateway or next(iter(self.gateway_targets))]
        parent, child = self._ctx.Pipe()
        args = (target, n, seed, images, new_tokens, photos, child, rounds, load)
        proc = self._ctx.Process(target=_chat_load, args=args, daemon=True)
        proc.start()
        tokens, seconds, hits = parent.recv()
        proc.join()
        if hits:
            raise RuntimeError(f"{hits} encoder cache hits in a load meant to encode every image (seed {seed})")
        return tokens, seconds

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.join(10)


def _sampling(n: int):
    from services.gen.ola.common.v1 import sampling_pb2

    return sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=n)


def throughput(
    stack: Stack,
    concurrency: list[int],
    new_tokens: int,
    images: int = 1,
    repeats: int = 3,
    chats: int = 32,
    load: str = "closed",
) -> list[dict[str, Any]]:
    """Chats with ``images`` fresh 320×240 images each (0: text chats), N at a time through the services vs one at
    a time through ``ola_model`` generation. A run is at least ``chats`` chats, N in flight at a time (``load``:
    see :func:`_chat_load`), or as many chats one at a time. Each arm runs ``repeats`` times per N (fresh images
    each time); the medians are compared."""
    from ola_model import OlaRequest, SamplingParams

    rows = []
    stack.load(1, seed=fresh_seed(), images=images, new_tokens=new_tokens)  # warm-up of every path, both arms
    warm = stack.pipeline.prepare(OlaRequest(_question(0), images=[_png(2, (320, 240))] * images))
    generate_ids(stack.pipeline.model, [warm.embeds], SamplingParams.greedy(max_new_tokens=4), stack.pipeline.stop_ids)
    params = SamplingParams.greedy(max_new_tokens=new_tokens)
    for n in concurrency:
        rounds = max(1, math.ceil(chats / n))
        served, local, engine_alone = [], [], []
        max_batch = 0
        for _ in range(repeats):
            seed = fresh_seed()  # fresh images for every run: no encoder cache hit in either arm
            stack.llm_stats()
            served_tokens, served_s = stack.load(n, seed, images, new_tokens, rounds=rounds, load=load)
            served.append(served_tokens / served_s)
            max_batch = max(max_batch, stack.llm_stats()["max_batch"])

            pictures = [[_png(seed + 100 * i + j, (320, 240)) for j in range(images)] for i in range(n * rounds)]
            start = time.perf_counter()
            local_tokens = 0
            prompts = []
            for i in range(n * rounds):
                prompt = stack.pipeline.prepare(OlaRequest(_question(i), images=pictures[i]), reserve=new_tokens)
                ids = generate_ids(stack.pipeline.model, [prompt.embeds], params, stack.pipeline.stop_ids)[0]
                local_tokens += len(ids)
                prompts.append(prompt.embeds)
            local.append(local_tokens / (time.perf_counter() - start))
            prompts = prompts[:n]

            # For reference: the engine alone (no encoding, no RPC) decoding the same prompts as one batch.
            engine = LLMEngine(stack.pipeline.model, stack.pipeline.stop_ids, max_batch=n)
            for i, embeds in enumerate(prompts):
                engine.add(str(i), embeds, params)
            start = time.perf_counter()
            engine_tokens = 0
            while engine.has_work():
                engine_tokens += sum(1 for out in engine.step() if out.token_id is not None)
            engine_alone.append(engine_tokens / (time.perf_counter() - start))
        services_tok_s, local_tok_s = statistics.median(served), statistics.median(local)
        rows.append(
            {
                "images": images,
                "concurrency": n,
                "load": load,
                "repeats": repeats,
                "chats_per_run": n * rounds,
                "services_tok_s": services_tok_s,
                "one_at_a_time_tok_s": local_tok_s,
                "ratio": services_tok_s / local_tok_s,
                # each services run over the one-at-a-time run right after it: the two ran under the same load
                # of the (shared, noisy) machine, so this ratio drifts less than the arms' own figures
                "ratio_paired": statistics.median(a / b for a, b in zip(served, local, strict=True)),
                "ratio_min": min(served) / max(local),
                "ratio_max": max(served) / min(local),
                "engine_alone_tok_s": statistics.median(engine_alone),
                "tokens": served_tokens,
                "max_batch": max_batch,
                "services_runs_tok_s": served,
                "one_at_a_time_runs_tok_s": local,
            }
        )
        print(
            f"  {load}, {images} image(s), N={n}: services {services_tok_s:.0f} tok/s, "
            f"one at a time {local_tok_s:.0f} tok/s, "
            f"ratio {rows[-1]['ratio']:.2f}x, paired {rows[-1]['ratio_paired']:.2f}x (medians of {repeats})",
            file=sys.stderr,
        )
    return rows


def vision_replicas(stack: Stack, n: int, images: int, new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """An image-heavy load (``images`` per chat, short answers) through a gateway over 1, then 2 vision replicas;
    the LLM service is the same process throughout."""
    rows = []
    for replicas in sorted(stack.gateway_targets):
        stack.load(2, seed=fresh_seed(), images=images, new_tokens=new_tokens, gateway=replicas, photos=True)
        chats, seconds = 0, 0.0
        for _ in range(rounds):
            seed = fresh_seed()  # fresh images: no cache hit
            _, s = stack.load(n, seed, images, new_tokens, gateway=replicas, photos=True)
            chats, seconds = chats + n, seconds + s
        rows.append(
            {"vision_replicas": replicas, "chats_per_s": chats / seconds, "images_per_s": chats * images / seconds}
        )
    for row in rows:
        row["ratio"] = row["chats_per_s"] / rows[0]["chats_per_s"]
    return rows


def cache(stack: Stack, repeats: int) -> list[dict[str, Any]]:
    from services.gen.ola.common.v1 import media_pb2
    from services.gen.ola.vision.v1 import vision_pb2

    rows = []
    images = [_png(i, (1000, 750)) for i in range(repeats + 1)]  # made before timing: only the RPC is timed
    videos = [_mp4(16, (320, 240 + 16 * i)) for i in range(repeats + 1)]
    cases = {
        "image 1000x750": lambda i: stack.vision_stub.EncodeImages(
            vision_pb2.EncodeImagesRequest(model_version=VERSION, images=[media_pb2.MediaRef(inline_data=images[i])])
        ),
        "video 16 frames 320x240": lambda i: stack.vision_stub.EncodeVideo(
            vision_pb2.EncodeVideoRequest(model_version=VERSION, video=media_pb2.MediaRef(inline_data=videos[i]))
        ),
    }
    for name, call in cases.items():
        call(repeats)  # warm-up (its own input)
        miss, hit = [], []
        for i in range(repeats):
            start = time.perf_counter()
            first = call(i)
            miss.append(time.perf_counter() - start)
            start = time.perf_counter()
            second = call(i)
            hit.append(time.perf_counter() - start)
            blocks = [*getattr(second, "blocks", [])] or [second.block]
            assert all(b.cache_hit for b in blocks), "the repeated request was not a cache hit"
            assert first is not None
        rows.append(
            {
                "input": name,
                "miss_ms": 1e3 * statistics.median(miss),
                "hit_ms": 1e3 * statistics.median(hit),
                "ratio": statistics.median(miss) / statistics.median(hit),
            }
        )
    return rows


def first_audio(stack: Stack, lengths: list[int], attempts: int, new_tokens: int) -> list[dict[str, Any]]:
    """Per answer length (sentences), ``attempts`` answers: time to the first audio chunk of a speaking chat vs the
    same answer as text, then the whole of it sent to TTS. Two baselines: the TTS's first chunk of the whole answer
    (a streaming TTS: the stricter one), and its last chunk (a TTS that returns the whole waveform, the shape of
    serving without streaming, as vLLM-Omni serves Qwen2.5-Omni)."""
    from services.gen.ola.omni.v1 import omni_pb2
    from services.gen.ola.tts.v1 import tts_pb2

    rows = []
    tts = stack_tts(stack)
    for length in lengths:
        version = talker_version(length)
        for seed in range(-1, attempts):  # attempt -1 warms the talker's path up and is not kept
            req = omni_pb2.ChatRequest(
                model_version=version,
                text=f"Tell me about picture number {seed}. Describe it in several sentences.",
                output_modalities=[omni_pb2.OUTPUT_MODALITY_TEXT, omni_pb2.OUTPUT_MODALITY_AUDIO],
                speech=omni_pb2.SpeechOptions(sample_rate_hz=16000),
                sampling=_sampling(new_tokens),
            )
            start = time.perf_counter()
            first = None
            final = None
            for event in stack.omni.Chat(req, timeout=600):
                if event.HasField("audio_chunk") and first is None:
                    first = time.perf_counter() - start
                if event.HasField("final"):
                    final = event.final
            if final is None or first is None:
                raise RuntimeError(f"{version} gave no speech")
            # Baseline: the same answer, text only, then the whole answer spoken at once.
            req_text = omni_pb2.ChatRequest(model_version=version, text=req.text, sampling=req.sampling)
            start = time.perf_counter()
            text = "".join(e.final.text for e in stack.omni.Chat(req_text, timeout=600) if e.HasField("final"))
            whole = None
            for _ in tts.Synthesize(tts_pb2.SynthesizeRequest(text=text, voice="auto", sample_rate_hz=16000)):
                if whole is None:
                    whole = time.perf_counter() - start
            waveform = time.perf_counter() - start
            if seed < 0:
                continue
            rows.append(
                {
                    "talker_sentences": length,
                    "sentences": final.num_sentences,
                    "chars": len(text),
                    "sentence_wise_ms": 1e3 * first,
                    "whole_answer_ms": 1e3 * whole,
                    "ratio": whole / first,
                    "whole_waveform_ms": 1e3 * waveform,
                    "waveform_ratio": waveform / first,
                }
            )
    return rows


def first_audio_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per answer length."""
    out = []
    for length in sorted({r["talker_sentences"] for r in rows}):
        mine = [r for r in rows if r["talker_sentences"] == length]
        out.append(
            {
                "sentences": statistics.median(r["sentences"] for r in mine),
                "answers": len(mine),
                "sentence_wise_ms": statistics.median(r["sentence_wise_ms"] for r in mine),
                "whole_answer_ms": statistics.median(r["whole_answer_ms"] for r in mine),
                "ratio": statistics.median(r["ratio"] for r in mine),
                "whole_waveform_ms": statistics.median(r["whole_waveform_ms"] for r in mine),
                "waveform_ratio": statistics.median(r["waveform_ratio"] for r in mine),
            }
        )
    return out


def stack_tts(stack: Stack):
    from services.gen.ola.tts.v1 import tts_pb2_grpc

    return tts_pb2_grpc.TTSServiceStub(grpc.insecure_channel(stack.tts_target))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per N and arm (medians compared)")
    parser.add_argument("--chats", type=int, default=32, help="fewest chats in one throughput run")
    parser.add_argument(
        "--load",
        default="closed",
        help="throughput loads, comma-separated: closed (N clients, each starting its next chat when its last ends) "
        "and/or bursts (bursts of N chats, each waiting for its slowest chat)",
    )
    parser.add_argument("--kinds", default="image,text", help="throughput chats: image and/or text")
    parser.add_argument("--stream-interval-ms", type=float, default=20.0, help="the LLM service's (default 20)")
    parser.add_argument("--cache-repeats", type=int, default=3)
    parser.add_argument("--audio-attempts", type=int, default=5, help="answers per length (0: skip this part)")
    parser.add_argument("--audio-sentences", default="3,4,6,8", help="answer lengths of the talker versions")
    parser.add_argument("--audio-tokens", type=int, default=320)
    parser.add_argument("--vision-chats", type=int, default=8, help="concurrent chats of the image-heavy load")
    parser.add_argument("--vision-images", type=int, default=2, help="images per chat of the image-heavy load")
    parser.add_argument("--vision-rounds", type=int, default=3, help="0: skip the 1 vs 2 vision replicas part")
    parser.add_argument("--no-pin", action="store_true", help="let vision replicas use every CPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for flag, value, known in (("--load", args.load, LOADS), ("--kinds", args.kinds, KINDS)):
        unknown = sorted(set(value.split(",")) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    import tempfile

    lengths = [int(n) for n in args.audio_sentences.split(",")] if args.audio_attempts else []
    scratch = Path(tempfile.mkdtemp(prefix="talkers-"))  # removed at the end
    talkers = {talker_version(n): str(train_talker(scratch / str(n), n)) for n in lengths}
    concurrency = [int(n) for n in args.concurrency.split(",")]
    gateways = (1, 2) if args.vision_rounds else (1,)
    stack = Stack(
        max_batch=max(concurrency),
        talkers=talkers,
        stream_interval_ms=args.stream_interval_ms,
        vision_replicas=max(gateways),
        gateways=gateways,
        pin_vision=not args.no_pin,
    )
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    try:
        print("throughput ...", file=sys.stderr)
        result["throughput"] = [
            row
            for load in args.load.split(",")
            for kind in args.kinds.split(",")
            for row in throughput(
                stack,
                concurrency,
                args.new_tokens,
                KINDS[kind],
                repeats=args.repeats,
                chats=args.chats,
                load=load,
            )
        ]
        print(
            format_table(
                result["throughput"],
                [
                    ("load", "load"),
                    ("images", "images"),
                    ("concurrency", "N"),
                    ("services_tok_s", "services tok/s"),
                    ("one_at_a_time_tok_s", "one-at-a-time tok/s"),
                    ("ratio", "ratio"),
                    ("ratio_paired", "paired ratio"),
                    ("ratio_min", "lowest"),
                    ("ratio_max", "highest"),
                    ("engine_alone_tok_s", "engine alone tok/s"),
                    ("max_batch", "largest batch"),
                ],
            )
        )
        result["cache"] = cache(stack, args.cache_repeats) if args.cache_repeats else []
        if result["cache"]:
            print(
                format_table(
                    result["cache"],
                    [("input", "input"), ("miss_ms", "miss ms"), ("hit_ms", "hit ms"), ("ratio", "miss/hit")],
                )
            )
        result["first_audio"] = first_audio(stack, lengths, args.audio_attempts, args.audio_tokens)
        if result["first_audio"]:
            result["first_audio_summary"] = first_audio_summary(result["first_audio"])
            print(
                format_table(
                    result["first_audio_summary"],
                    [
                        ("sentences", "sentences"),
                        ("answers", "answers"),
                        ("sentence_wise_ms", "sentence-wise ms"),
                        ("whole_answer_ms", "whole answer, first chunk ms"),
                        ("ratio", "ratio"),
                        ("whole_waveform_ms", "whole answer, whole waveform ms"),
                        ("waveform_ratio", "ratio"),
                    ],
                )
            )
        if args.vision_rounds:
            print("vision replicas ...", file=sys.stderr)
            result["vision_replicas"] = vision_replicas(
                stack, args.vision_chats, args.vision_images, 8, args.vision_rounds
            )
            print(
                format_table(
                    result["vision_replicas"],
                    [
                        ("vision_replicas", "vision replicas"),
                        ("chats_per_s", "chats/s"),
                        ("images_per_s", "images/s"),
                        ("ratio", "vs 1 replica"),
                    ],
                )
            )
    finally:
        stack.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
