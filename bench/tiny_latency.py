"""Per-stage latency of the Ola model with random weights: encoders, projectors, feature extraction, prefill, decode.

Every stage runs ``--warmup`` times untimed and ``--repeats`` times timed; the table shows the median (and the
minimum). Inputs are synthetic and seeded: a 640x480 image (both views), a 16-frame video of 288x288 frames, one
30 s audio chunk. Decode uses :func:`ola_model.generation.decode` with greedy sampling, no stop ids and a fixed
number of steps; its time excludes the prefill (the first step).

The default is the ``tiny`` preset on CPU with torch's default thread count. The same script measures an
Ola-7b-shaped model on a GPU::

    .venv/bin/python -m bench.tiny_latency                                   # tiny, CPU, float32
    .venv/bin/python -m bench.tiny_latency --preset ola-7b --device cuda --dtype bfloat16 --json ola7b.json

On CUDA the decode rows also show the fraction of the memory-bandwidth bound achieved: one decode step must read
every decoder weight except the embedding table once, so it takes at least ``bytes / --bandwidth`` seconds
(4.8e12 B/s: an H200's HBM3e).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench._common import DTYPES, format_table, machine_info, median, run_and_report, sync, time_call
from ola_model.config import OlaConfig
from ola_model.generation import SamplingParams, decode
from ola_model.model import OlaModel, build_model
from ola_model.processing.audio import CHUNK_SAMPLES, process_audio
from ola_model.processing.image import process_image

log = logging.getLogger("bench.tiny_latency")

DEFAULT_BANDWIDTH = 4.8e12  # bytes/s, H200 HBM3e


# ---------------------------------------------------------------------------------------------------------- inputs
def synthetic_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded CPU inputs: an RGB image, a 30 s waveform and normalised video frames."""
    rng = np.random.default_rng(args.seed)
    width, height = args.image_size
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    wav = torch.from_numpy((0.1 * rng.standard_normal(CHUNK_SAMPLES)).astype(np.float32))  # (480000,)
    gen = torch.Generator().manual_seed(args.seed)
    side = args.video_size
    frames = torch.rand(args.video_frames, 3, side, side, generator=gen) * 2 - 1  # (T, 3, H, W) in [-1, 1]
    return {"image": image, "wav": wav, "frames": frames}


def llm_weight_bytes(model: OlaModel) -> int:
    """Bytes one decode step reads: every decoder weight except the embedding table (only B rows of it are read)."""
    embed = model.llm.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.llm.parameters() if p is not embed)


# ---------------------------------------------------------------------------------------------------------- stages
def encoder_stages(model: OlaModel, inputs: dict[str, Any]) -> list[tuple[str, str, Callable[[], object]]]:
    """(stage, what, callable) for the preprocessing and encoder stages, inputs prepared on the model's device."""
    device, dtype = model.device, model.dtype
    views = process_image(inputs["image"])
    pair = (views.lowres.to(device, dtype), views.highres.to(device, dtype))
    frames = inputs["frames"].to(device, dtype)
    audio = process_audio(inputs["wav"])
    mel = audio.mel.to(device)  # (1, 3000, 128)
    wav = audio.wav_chunks.to(device)  # (1, 480000)
    whisper = model.speech_encoder.whisper_model
    beats = model.speech_encoder.beats_model
    fused = torch.randn(1, 1500, model.config.speech_encoder_hidden_size, device=device, dtype=dtype)
    w, h = inputs["image"].size
    lo, hi = views.lowres_size, views.highres_size
    views_text = f"{w}x{h} -> {lo[0]}x{lo[1]} + {hi[0]}x{hi[1]}"
    T, side = frames.shape[0], frames.shape[-1]
    return [
        ("image preprocessing", views_text, lambda: process_image(inputs["image"])),
        ("ViT + projector, image", "both views", lambda: model.encode_images([pair])),
        ("ViT + projector, video", f"{T} frames {side}x{side}", lambda: model.encode_video(frames)),
        ("mel features", "30 s", lambda: process_audio(inputs["wav"])),
        ("Whisper encoder", "30 s chunk", lambda: whisper(mel.transpose(1, 2).to(dtype)).last_hidden_state),
        ("BEATs (incl. fbank)", "30 s chunk", lambda: beats.extract_features(wav)),
        ("speech projector", "1500 frames", lambda: model.speech_projector(fused)),
    ]


def prefill(model: OlaModel, length: int, seed: int) -> Callable[[], object]:
    """One decoder pass over ``length`` random embeddings (batch 1) building the KV cache, last logits only."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, model.config.llm.hidden_size, generator=gen)
    embeds = embeds.to(model.device, model.dtype) * 0.02  # (1, L, C), embedding-table scale
    return lambda: model(embeds, use_cache=True, logits_to_keep=1)


def decode_run(model: OlaModel, batch: int, prompt_len: int, steps: int, seed: int) -> tuple[float, float]:
    """Greedy-decode ``steps`` tokens for ``batch`` prompts; (prefill + first token s, later steps s)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.tokenizer_vocab_size, (batch, prompt_len), generator=gen)
    with torch.inference_mode():
        prompts = list(model.embed_tokens(ids.to(model.device)))  # B x (L, C)
    params = SamplingParams.greedy(max_new_tokens=steps)
    sync(model.device)
    start = time.perf_counter()
    first = start
    count = 0
    for count, _ in enumerate(decode(model, prompts, params, stop_ids=[]), start=1):
        if count == 1:
            first = time.perf_counter()  # tokens are Python ints: the step has finished on the device
    if count != steps:
        raise RuntimeError(f"decode produced {count} steps, expected {steps}")
    return first - start, time.perf_counter() - first


# ------------------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    config = OlaConfig.from_name(args.preset)
    start = time.perf_counter()
    model = build_model(config, device=device, dtype=dtype, seed=args.seed)
    log.info("built %s on %s (%s) in %.1f s", args.preset, device, args.dtype, time.perf_counter() - start)
    inputs = synthetic_inputs(args)
    rows: list[dict[str, Any]] = []

    def add(stage: str, what: str, times: list[float], **extra: Any) -> None:
        rows.append({"stage": stage, "what": what, "median_s": median(times), "min_s": min(times), **extra})
        log.info("%s (%s): %.4f s", stage, what, rows[-1]["median_s"])

    with torch.inference_mode():
        for stage, what, fn in encoder_stages(model, inputs):
            add(stage, what, time_call(fn, device, args.repeats, args.warmup))
        for length in args.prefill:
            times = time_call(prefill(model, length, args.seed), device, args.repeats, args.warmup)
            add("LLM prefill", f"{length} positions", times, tokens_per_s=length / median(times))

    step_bytes = llm_weight_bytes(model)
    for batch in args.decode_batch:
        for _ in range(args.warmup):
            decode_run(model, batch, args.decode_prompt, args.decode_steps, args.seed)
        runs = [decode_run(model, batch, args.decode_prompt, args.decode_steps, args.seed) for _ in range(args.repeats)]
        step_times = [later / (args.decode_steps - 1) for _, later in runs]
        step = median(step_times)
        extra: dict[str, Any] = {"tokens_per_s": batch / step, "step_s": step}
        if device.type == "cuda":
            extra["bandwidth_fraction"] = step_bytes / args.bandwidth / step
        add("LLM decode", f"batch {batch}, per step", step_times, **extra)

    return {
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "decode_step_weight_bytes": step_bytes,
        "bandwidth_bytes_per_s": args.bandwidth if device.type == "cuda" else None,
        "params": model.part_num_params(),
        "stages": rows,
        "machine": machine_info(device),
    }


def report(result: dict[str, Any]) -> str:
    columns = [("stage", "stage"), ("what", "input"), ("median_ms", "median ms"), ("min_ms", "min ms"),
               ("tokens_per_s", "tokens/s")]  # fmt: skip
    if result["device"].startswith("cuda"):
        columns.append(("bandwidth_fraction", "of HBM bound"))
    m = result["machine"]
    head = (
        f"{result['preset']} on {result['device']} ({result['dtype']}), median of {result['repeats']} after "
        f"{result['warmup']} warm-up, {m['torch_threads']} torch threads, {m['cpu_count']} CPUs"
    )
    rows = [{**r, "median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3} for r in result["stages"]]
    lines = [head, format_table(rows, columns)]
    if result["bandwidth_bytes_per_s"]:
        bound = result["decode_step_weight_bytes"] / result["bandwidth_bytes_per_s"]
        lines.append(
            f"decode bound: {result['decode_step_weight_bytes'] / 1e9:.2f} GB of weights per step / "
            f"{result['bandwidth_bytes_per_s']:.2g} B/s = {bound * 1e3:.2f} ms per step"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "ola-7b"], default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per stage (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per stage first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--image-size", type=_size, default=(640, 480), help="WxH of the synthetic image")
    p.add_argument("--video-frames", type=int, default=16)
    p.add_argument("--video-size", type=int, default=288, help="side of the square video frames (multiple of 32)")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048], help="prefill lengths")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--decode-prompt", type=int, default=64, help="prompt tokens before decoding")
    p.add_argument("--decode-steps", type=int, default=64, help="tokens generated per sequence (>= 2)")
    p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="GPU memory bandwidth, B/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.decode_steps < 2:
        p.error("--decode-steps must be >= 2 (the first step is the prefill)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_and_report(args, run, report)


if __name__ == "__main__":
    main()
