"""Serving benchmarks, each side by side against its baseline in one run, reported as ratios.

1. Throughput: N concurrent chats through the services (gateway -> encoders -> LLM with continuous batching) vs the
   same requests answered one at a time by ``ola_model`` local generation (the shape of Ola's ``infer.py``), at
   N = 1, 4, 8, 16. Same weights (one model version), same greedy decoding, same number of new tokens.
2. Encoder cache: EncodeImages / EncodeVideo of a repeated input, hit vs miss.
3. Time to first audio: sentence-wise speech while the LLM goes on vs speaking the whole answer after it finishes,
   on answers of at least 3 sentences. The answers come from a second model version, "talker": the tiny model whose
   LLM is trained here (a few seconds) to answer any question with a fixed paragraph of several sentences, since
   the synthetic-data demo model answers in a word or a phrase. Only the answer's length matters to this
   comparison; the path (gateway, LLM service, sentence cutting, TTS) is the real one.

Everything runs on this machine over real gRPC on loopback (grpc.aio servers in a background event loop, real
espeak-ng). Run: ``.venv/bin/python -m bench.serving [--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
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
from ola_model.generation import generate_ids

VERSION = "tiny"
TALKER = "talker"
PARAGRAPH = (
    "The picture shows three red circles on the left. A blue square sits in the middle of the scene. "
    "Two green triangles point upward on the right. The background is a plain light gray."
)


def train_talker(out_dir, steps: int = 120, seed: int = 0):
    """Save a tiny checkpoint whose LLM answers every chat prompt with ``PARAGRAPH`` (trained here, ~seconds)."""
    import torch
    import torch.nn.functional as F

    from ola_model import OlaConfig, build_model, save_checkpoint
    from ola_model.prompt import SYSTEM_PROMPT
    from ola_model.tokenizer import tiny_tokenizer

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = build_model(OlaConfig.from_name("tiny"), seed=seed)
    answer = tok(PARAGRAPH + "<|im_end|>", add_special_tokens=False)["input_ids"]
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


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


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


class Stack:
    """Encoders + LLM (one grpc.aio server), TTS, and the gateway, all on loopback."""

    def __init__(self, max_batch: int = 16, talker=None) -> None:
        from services.audio import AudioEncoderServicer
        from services.audio import add_to_server as add_audio
        from services.gateway import GatewayConfig, GrpcBackends, OmniGateway, OmniServicer
        from services.gen.ola.omni.v1 import omni_pb2_grpc
        from services.gen.ola.vision.v1 import vision_pb2_grpc
        from services.llm import LLMServiceConfig, LLMServicer
        from services.llm import add_to_server as add_llm
        from services.registry import ModelRegistry, ModelSource, RegistryConfig
        from services.tts.servicer import TTSServicer, build_server
        from services.vision import VisionEncoderServicer
        from services.vision import add_to_server as add_vision

        self.aio = _Loop()
        self.servers: list[grpc.aio.Server] = []
        versions = {VERSION: ModelSource(preset="tiny", seed=0)}
        if talker is not None:
            versions[TALKER] = ModelSource(checkpoint=talker)
        self.registry = ModelRegistry(RegistryConfig(versions=versions, default_version=VERSION))
        self.llm = LLMServicer(LLMServiceConfig(max_batch=max_batch), registry=self.registry)
        self.vision = VisionEncoderServicer(registry=self.registry)
        audio = AudioEncoderServicer(registry=self.registry)

        async def start(register) -> int:
            server = grpc.aio.server(
                options=[("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
            )
            register(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)  # keep a reference: an unreferenced server is collected and stops
            return port

        def register_models(server) -> None:
            health = add_llm(server, self.llm)
            add_vision(server, self.vision, health)
            add_audio(server, audio, health)

        model_port = self.aio.run(start(register_models))
        self.tts_server, tts_port = build_server(TTSServicer.from_config({"sample_rate": 16000}))
        self.tts_target = f"127.0.0.1:{tts_port}"

        async def gateway():
            backends = GrpcBackends(*(f"127.0.0.1:{p}" for p in (model_port, model_port, model_port, tts_port)))
            return OmniGateway(backends, GatewayConfig(default_model_version=VERSION))

        gw = self.aio.run(gateway())
        port = self.aio.run(start(lambda s: omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gw), s)))
        options = [("grpc.max_receive_message_length", 1 << 28)]
        self.omni = omni_pb2_grpc.OmniServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=options))
        self.vision_stub = vision_pb2_grpc.VisionEncoderServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{model_port}", options=options)
        )
        self.pipeline = self.registry.get(VERSION).pipeline


def _sampling(n: int):
    from services.gen.ola.common.v1 import sampling_pb2

    return sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=n)


def throughput(stack: Stack, concurrency: list[int], new_tokens: int) -> list[dict[str, Any]]:
    from ola_model import OlaRequest, SamplingParams
    from services.gen.ola.common.v1 import media_pb2
    from services.gen.ola.omni.v1 import omni_pb2

    rows = []
    for n in concurrency:
        images = [_png(1000 + i, (320, 240)) for i in range(n)]
        questions = [f"Question {i}: what do you see?" for i in range(n)]

        def chat(i: int) -> int:
            req = omni_pb2.ChatRequest(
                text=questions[i], images=[media_pb2.MediaRef(inline_data=images[i])], sampling=_sampling(new_tokens)
            )
            tokens = 0
            for event in stack.omni.Chat(req, timeout=600):
                if event.HasField("usage"):
                    tokens = event.usage.completion_tokens
            return tokens

        chat(0)  # warm-up of every path
        stack.llm.max_batch_size = 0
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            served_tokens = sum(pool.map(chat, range(n)))
        served_s = time.perf_counter() - start

        params = SamplingParams.greedy(max_new_tokens=new_tokens)
        start = time.perf_counter()
        local_tokens = 0
        for i in range(n):
            prompt = stack.pipeline.prepare(OlaRequest(questions[i], images=[images[i]]), reserve=new_tokens)
            local_tokens += len(generate_ids(stack.pipeline.model, [prompt.embeds], params, stack.pipeline.stop_ids)[0])
        local_s = time.perf_counter() - start
        rows.append(
            {
                "concurrency": n,
                "services_tok_s": served_tokens / served_s,
                "one_at_a_time_tok_s": local_tokens / local_s,
                "ratio": (served_tokens / served_s) / (local_tokens / local_s),
                "tokens": served_tokens,
                "max_batch": stack.llm.max_batch_size,
            }
        )
        print(
            f"  N={n}: services {rows[-1]['services_tok_s']:.0f} tok/s, one at a time "
            f"{rows[-1]['one_at_a_time_tok_s']:.0f} tok/s, ratio {rows[-1]['ratio']:.2f}x",
            file=sys.stderr,
        )
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


def first_audio(stack: Stack, attempts: int, new_tokens: int) -> list[dict[str, Any]]:
    from services.gen.ola.omni.v1 import omni_pb2
    from services.gen.ola.tts.v1 import tts_pb2

    rows = []
    for seed in range(attempts):
        req = omni_pb2.ChatRequest(
            model_version=TALKER,
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
        if final is None or final.num_sentences < 3 or first is None:
            continue
        # Baseline: the same answer, text only, then the whole answer spoken at once.
        req_text = omni_pb2.ChatRequest(model_version=TALKER, text=req.text, sampling=req.sampling)
        start = time.perf_counter()
        text = "".join(e.final.text for e in stack.omni.Chat(req_text, timeout=600) if e.HasField("final"))
        tts = stack_tts(stack)
        for _ in tts.Synthesize(tts_pb2.SynthesizeRequest(text=text, voice="auto", sample_rate_hz=16000)):
            whole = time.perf_counter() - start
            break
        rows.append(
            {
                "sentences": final.num_sentences,
                "chars": len(text),
                "sentence_wise_ms": 1e3 * first,
                "whole_answer_ms": 1e3 * whole,
                "ratio": whole / first,
            }
        )
    return rows


def stack_tts(stack: Stack):
    from services.gen.ola.tts.v1 import tts_pb2_grpc

    return tts_pb2_grpc.TTSServiceStub(grpc.insecure_channel(stack.tts_target))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache-repeats", type=int, default=3)
    parser.add_argument("--audio-attempts", type=int, default=3)
    parser.add_argument("--audio-tokens", type=int, default=160)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import tempfile

    talker = train_talker(Path(tempfile.mkdtemp(prefix="talker-")) / "ckpt") if args.audio_attempts else None
    stack = Stack(max_batch=max(int(n) for n in args.concurrency.split(",")), talker=talker)
    result: dict[str, Any] = {"machine": machine_info()}
    print("throughput ...", file=sys.stderr)
    result["throughput"] = throughput(stack, [int(n) for n in args.concurrency.split(",")], args.new_tokens)
    print(
        format_table(
            result["throughput"],
            [
                ("concurrency", "N"),
                ("services_tok_s", "services tok/s"),
                ("one_at_a_time_tok_s", "one-at-a-time tok/s"),
                ("ratio", "ratio"),
            ],
        )
    )
    result["cache"] = cache(stack, args.cache_repeats)
    print(
        format_table(
            result["cache"], [("input", "input"), ("miss_ms", "miss ms"), ("hit_ms", "hit ms"), ("ratio", "miss/hit")]
        )
    )
    result["first_audio"] = first_audio(stack, args.audio_attempts, args.audio_tokens)
    if result["first_audio"]:
        print(
            format_table(
                result["first_audio"],
                [
                    ("sentences", "sentences"),
                    ("sentence_wise_ms", "sentence-wise ms"),
                    ("whole_answer_ms", "whole answer ms"),
                    ("ratio", "ratio"),
                ],
            )
        )
    else:
        print("no answer of >= 3 sentences in the attempts; raise --audio-tokens or --audio-attempts")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
