"""Concurrent streams through the continuous-batching engine vs transformers' ``generate`` one request at a time.

The GPU check of the serving work: Ola-7b-shaped random bfloat16 weights on one GPU, N = 1, 8 and 32 concurrent
streams, tokens/s and time to first token, side by side with transformers' ``generate`` answering the same
requests one at a time (the shape of Ola's ``infer.py``), and the engine's decode step against the memory-bandwidth
bound (a step reads every decoder weight but the embedding table at least once). The default is the tiny preset on
CPU, which the fast test suite runs at toy size::

    .venv/bin/python -m bench.engine_streams                                                  # tiny, CPU
    .venv/bin/python -m bench.engine_streams --preset ola-7b --device cuda --dtype bfloat16 --json ola7b.json

Every stream has its own random prompt (``--prompt`` tokens, embedded) and decodes exactly ``--new-tokens`` tokens
greedily (no stop ids in either arm). The engine arm adds all N requests at once and steps until they finish; a
stream's time to first token is from then to its first token. The baseline's time to first token is a ``generate``
call with one new token.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import DTYPES, format_table, machine_info, run_and_report, sync
from bench.tiny_latency import DEFAULT_BANDWIDTH, llm_weight_bytes
from ola_model.config import OlaConfig
from ola_model.engine import LLMEngine
from ola_model.generation import SamplingParams
from ola_model.model import OlaModel, build_model

log = logging.getLogger("bench.engine_streams")


def prompts(model: OlaModel, n: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.tokenizer_vocab_size, (n, length), generator=gen)
    with torch.inference_mode():
        return list(model.embed_tokens(ids.to(model.device)))  # n x (L, C)


def engine_arm(model: OlaModel, embeds: list[torch.Tensor], new_tokens: int) -> dict[str, Any]:
    """All requests added at once, stepped to the end: tokens/s, time to first token per stream, step times."""
    engine = LLMEngine(model, stop_ids=[], max_batch=len(embeds))
    params = SamplingParams.greedy(max_new_tokens=new_tokens)
    sync(model.device)
    start = time.perf_counter()
    for i, e in enumerate(embeds):
        engine.add(str(i), e, params)
    first: dict[str, float] = {}
    tokens = 0
    full_steps: list[float] = []  # decode steps with every stream running (no admission in them)
    while engine.has_work():
        before = time.perf_counter()
        outputs = engine.step()  # token ids come back as Python ints: the step has finished on the device
        now = time.perf_counter()
        admitting = len(first) < len(embeds)
        for out in outputs:
            if out.token_id is not None:
                tokens += 1
                first.setdefault(out.request_id, now - start)
        if not admitting and len(outputs) == len(embeds):
            full_steps.append(now - before)
    total = time.perf_counter() - start
    if tokens != len(embeds) * new_tokens:
        raise RuntimeError(f"the engine produced {tokens} tokens, expected {len(embeds) * new_tokens}")
    ttft = sorted(first.values())
    return {
        "tok_s": tokens / total,
        "ttft_median_ms": 1e3 * statistics.median(ttft),
        "ttft_max_ms": 1e3 * ttft[-1],
        "step_ms": 1e3 * statistics.median(full_steps) if full_steps else None,
    }


def generate_arm(model: OlaModel, embeds: list[torch.Tensor], new_tokens: int) -> dict[str, Any]:
    """transformers' generate, one request at a time: tokens/s; time to first token (generate of one token)."""

    def generate(e: torch.Tensor, n: int) -> int:
        out = model.llm.generate(
            inputs_embeds=e[None],
            attention_mask=torch.ones(1, e.shape[0], dtype=torch.long, device=e.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=model.config.llm.pad_token_id,
        )
        return int(out.shape[-1])

    with torch.inference_mode():
        sync(model.device)
        start = time.perf_counter()
        tokens = sum(generate(e, new_tokens) for e in embeds)
        sync(model.device)
        total = time.perf_counter() - start
        ttft = []
        for e in embeds[: min(len(embeds), 8)]:
            t0 = time.perf_counter()
            generate(e, 1)
            sync(model.device)
            ttft.append(time.perf_counter() - t0)
    if tokens != len(embeds) * new_tokens:
        raise RuntimeError(f"generate produced {tokens} tokens, expected {len(embeds) * new_tokens}")
    return {"tok_s": tokens / total, "ttft_median_ms": 1e3 * statistics.median(ttft)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build_model(OlaConfig.from_name(args.preset), device=device, dtype=DTYPES[args.dtype], seed=args.seed)
    model.eval()
    log.info("built %s on %s (%s) in %.1f s", args.preset, device, args.dtype, time.perf_counter() - start)
    weight_bytes = llm_weight_bytes(model)
    bound_ms = 1e3 * weight_bytes / args.bandwidth if device.type == "cuda" else None
    warm = prompts(model, 2, args.prompt, seed=args.seed + 99)
    engine_arm(model, warm, 2)  # warm-up of both arms (kernels, allocator)
    generate_arm(model, warm[:1], 2)
    rows = []
    for n in args.streams:
        embeds = prompts(model, n, args.prompt, seed=args.seed + n)
        eng = engine_arm(model, embeds, args.new_tokens)
        hf = generate_arm(model, embeds, args.new_tokens)
        row = {
            "streams": n,
            "engine_tok_s": eng["tok_s"],
            "generate_tok_s": hf["tok_s"],
            "ratio": eng["tok_s"] / hf["tok_s"],
            "engine_ttft_median_ms": eng["ttft_median_ms"],
            "engine_ttft_max_ms": eng["ttft_max_ms"],
            "generate_ttft_ms": hf["ttft_median_ms"],
            "step_ms": eng["step_ms"],
            "bound_fraction": bound_ms / eng["step_ms"] if bound_ms and eng["step_ms"] else None,
        }
        rows.append(row)
        log.info("N=%d: engine %.0f tok/s, generate one at a time %.0f tok/s", n, row["engine_tok_s"], hf["tok_s"])
    result = {
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "decode_step_weight_bytes": weight_bytes,
        "bandwidth_bound_step_ms": bound_ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "rows": rows,
    }
    return result


def report(result: dict[str, Any]) -> str:
    columns = [
        ("streams", "N"),
        ("engine_tok_s", "engine tok/s"),
        ("generate_tok_s", "generate 1-at-a-time tok/s"),
        ("ratio", "ratio"),
        ("engine_ttft_median_ms", "engine TTFT median ms"),
        ("engine_ttft_max_ms", "engine TTFT max ms"),
        ("generate_ttft_ms", "generate TTFT ms"),
        ("step_ms", "decode step ms"),
    ]
    if result["bandwidth_bound_step_ms"]:
        columns.append(("bound_fraction", "of bandwidth bound"))
    lines = [format_table(result["rows"], columns)]
    if result["bandwidth_bound_step_ms"]:
        lines.append(
            f"bandwidth bound: {result['decode_step_weight_bytes'] / 1e9:.2f} GB of decoder weights per step = "
            f"{result['bandwidth_bound_step_ms']:.2f} ms; peak memory {result['peak_memory_bytes'] / 2**30:.1f} GiB"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "ola-7b"], default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32], help="concurrent streams")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per stream")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per stream")
    p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="GPU memory bandwidth, B/s")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.streams) < 1 or args.prompt < 1 or args.new_tokens < 2:
        p.error("--streams and --prompt must be >= 1, --new-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_and_report(args, run, report)


if __name__ == "__main__":
    main()
