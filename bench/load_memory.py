"""Peak resident memory while loading an Ola checkpoint: our streaming loader vs the naive two-copy load.

A checkpoint of the Ola structure (tiny encoders, an enlarged Qwen2 decoder) of about ``--size-gb`` is generated
with random weights and written in several shards with :func:`~ola_model.checkpoint.ola_format.save_checkpoint`.
Each loader then runs in a fresh Python process, so its memory high-water mark is its own:

- ``ours``: :func:`~ola_model.checkpoint.ola_format.load_checkpoint` (build on ``meta``, ``to_empty``, read every
  tensor straight into its parameter's storage);
- ``naive`` (the baseline): build the model normally (random init on CPU), ``safetensors.torch.load_file`` every
  shard into one state dict, rename the keys through the same name map and ``model.load_state_dict(strict=True)``,
  so the weights exist twice.

The peak is measured inside the worker after ``import torch, ola_model``: the RSS at that point is the baseline and
the net peak is the high-water mark above it. On Linux the high-water mark is reset after the imports
(``/proc/self/clear_refs``) and read from ``VmHWM``; ``getrusage().ru_maxrss`` is reported too but is not used,
because at ``exec`` the kernel folds the parent process's high-water mark into it (a child of a parent that once
held 1 GB reports >= 1 GB). Both loads are checked to give the same weights.

Run from the repository root::

    .venv/bin/python -m bench.load_memory                 # ~1 GB float32 checkpoint
    .venv/bin/python -m bench.load_memory --size-gb 0.02 --shard-mb 4 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bench._common import DTYPES, format_table, machine_info, run_and_report
from ola_model.checkpoint.name_map import build_map, ola_checkpoint_name
from ola_model.checkpoint.ola_format import INDEX_FILE, load_checkpoint, read_config, save_checkpoint
from ola_model.config import OlaConfig
from ola_model.model import OlaModel, build_model

log = logging.getLogger("bench.load_memory")

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ours", "naive")
TARGET_RATIO = 1.3  # our net peak RSS / checkpoint bytes
LLM_LAYERS = 8
LLM_VOCAB = 16384
HEAD_DIM = 64
MB = 1e6


# ------------------------------------------------------------------------------------------------------- the model
def scaled_config(hidden_size: int) -> OlaConfig:
    """The tiny preset with its decoder widened to ``hidden_size`` (a multiple of 64): Qwen-like proportions."""
    base = OlaConfig.from_name("tiny")
    heads = hidden_size // HEAD_DIM
    llm = dataclasses.replace(
        base.llm,
        vocab_size=LLM_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=LLM_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=math.gcd(heads, 4),  # grouped-query attention where the head count allows
    )
    return dataclasses.replace(base, name="bench-load-memory", llm=llm)


def weight_bytes(config: OlaConfig, dtype: torch.dtype) -> int:
    """Bytes of every stored tensor of ``config`` at ``dtype`` (BEATs float32), from a ``meta`` build."""
    model = build_model(config, device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def config_for_size(target_bytes: int, dtype: torch.dtype) -> OlaConfig:
    """The :func:`scaled_config` whose weights come closest to ``target_bytes`` (hidden size in steps of 64)."""
    lo, hi = 1, 256  # hidden_size / 64; 16384 is far beyond any size this benchmark is meant for
    while lo < hi:  # the largest multiple whose size does not exceed the target
        mid = (lo + hi + 1) // 2
        if weight_bytes(scaled_config(mid * HEAD_DIM), dtype) <= target_bytes:
            lo = mid
        else:
            hi = mid - 1
    below, above = scaled_config(lo * HEAD_DIM), scaled_config((lo + 1) * HEAD_DIM)
    if abs(weight_bytes(above, dtype) - target_bytes) < abs(target_bytes - weight_bytes(below, dtype)):
        return above
    return below


def write_checkpoint(config: OlaConfig, dtype: torch.dtype, path: Path, shard_bytes: int) -> int:
    """Random weights of ``config`` saved as a sharded Ola checkpoint at ``path``. Returns the shard bytes on disk."""
    start = time.perf_counter()
    model = build_model(config, dtype=dtype, seed=0)
    save_checkpoint(model, path, max_shard_bytes=shard_bytes)
    del model
    gc.collect()
    log.info("wrote %s in %.1f s", path, time.perf_counter() - start)
    return checkpoint_bytes(path)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------------ the loaders
def naive_load(path: Path, dtype: torch.dtype) -> OlaModel:
    """The baseline: a randomly initialised model plus every shard in memory at once, then ``load_state_dict``."""
    model = build_model(read_config(path), dtype=dtype)
    index = json.loads((path / INDEX_FILE).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(safetensors.torch.load_file(path / shard))
    key_to_param = build_map(model.state_dict(), ola_checkpoint_name)
    model.load_state_dict({key_to_param[key]: tensor for key, tensor in state.items()}, strict=True)
    return model


def fingerprint(model: OlaModel) -> float:
    """A cheap checksum over the first 4096 values of every stored tensor, to check both loaders agree."""
    total = 0.0
    for _, tensor in sorted(model.state_dict().items()):
        total += float(tensor.detach().flatten()[:4096].double().abs().sum())
    return total


# ---------------------------------------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_in_process(method: str, path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Load ``path`` with ``method`` in this process and measure time and RSS (run it in a fresh process)."""
    gc.collect()
    reset = _reset_peak()
    rss_kb, hwm_kb = _status_kb("VmRSS"), _status_kb("VmHWM")
    exact = reset and rss_kb is not None and hwm_kb is not None
    base = rss_kb * 1024 if exact else _ru_maxrss_bytes()
    start = time.perf_counter()
    model = load_checkpoint(path, dtype=dtype) if method == "ours" else naive_load(path, dtype)
    seconds = time.perf_counter() - start
    hwm_kb = _status_kb("VmHWM")
    peak = hwm_kb * 1024 if exact and hwm_kb is not None else _ru_maxrss_bytes()
    return {
        "method": method,
        "load_s": seconds,
        "rss_after_import_bytes": base,
        "peak_rss_bytes": peak,
        "peak_net_bytes": peak - base,
        "ru_maxrss_bytes": _ru_maxrss_bytes(),
        "peak_source": "VmHWM (reset after imports)" if exact else "ru_maxrss",
        "fingerprint": fingerprint(model),
    }


def measure(method: str, path: Path, dtype_name: str) -> dict[str, Any]:
    """Run :func:`measure_in_process` in a fresh interpreter and return its result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "bench.load_memory", "--worker", method, "--checkpoint", str(path)]
    cmd += ["--dtype", dtype_name]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="target checkpoint size in GB (1e9 bytes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the generated weights")
    p.add_argument("--shard-mb", type=float, default=256.0, help="max shard size in MB (1e6 bytes)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoint (default: system temp)")
    p.add_argument("--checkpoint", type=Path, default=None, help="measure this existing checkpoint (never deleted)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or take) a checkpoint, measure both loaders in fresh processes, return the results."""
    dtype = DTYPES[args.dtype]
    tmp: Path | None = None
    path = args.checkpoint
    try:
        if path is None:
            config = config_for_size(int(args.size_gb * 1e9), dtype)
            tmp = Path(tempfile.mkdtemp(prefix="ola-bench-load-", dir=args.workdir))
            path = tmp / "checkpoint"
            log.info("generating a %.2f GB %s checkpoint (llm hidden %d)", args.size_gb, args.dtype,
                     config.llm.hidden_size)  # fmt: skip
            write_checkpoint(config, dtype, path, int(args.shard_mb * 1e6))
        size = checkpoint_bytes(path)
        results = {method: measure(method, path, args.dtype) for method in METHODS}
        num_shards = len(list(path.glob("*.safetensors")))
        llm_dims = dataclasses.asdict(read_config(path).llm)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            log.info("kept %s", path)
    ours, naive = results["ours"], results["naive"]
    if not math.isclose(ours["fingerprint"], naive["fingerprint"], rel_tol=1e-9):
        raise RuntimeError(f"the loaders disagree: fingerprint {ours['fingerprint']} vs {naive['fingerprint']}")
    for r in results.values():
        r["peak_net_over_size"] = r["peak_net_bytes"] / size
    ratio = ours["peak_net_bytes"] / naive["peak_net_bytes"]
    return {
        "checkpoint": {
            "path": str(path) if args.keep or args.checkpoint else None,
            "bytes": size,
            "shards": num_shards,
            "dtype": args.dtype,
            "llm": {k: llm_dims[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
        },
        "methods": results,
        "ours_over_naive": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ours["peak_net_over_size"] <= TARGET_RATIO,
        "machine": machine_info(),
    }


def report(result: dict[str, Any]) -> str:
    ckpt = result["checkpoint"]
    rows = [
        {
            "method": name + (" (baseline)" if name == "naive" else ""),
            "load_s": r["load_s"],
            "base": r["rss_after_import_bytes"] / MB,
            "peak": r["peak_rss_bytes"] / MB,
            "net": r["peak_net_bytes"] / MB,
            "ratio": r["peak_net_over_size"],
        }
        for name, r in result["methods"].items()
    ]
    columns = [("method", "loader"), ("load_s", "load s"), ("base", "RSS after import MB"), ("peak", "peak RSS MB"),
               ("net", "net peak MB"), ("ratio", "net peak / ckpt")]  # fmt: skip
    lines = [
        f"checkpoint: {ckpt['bytes'] / MB:.1f} MB in {ckpt['shards']} shards, {ckpt['dtype']}, llm {ckpt['llm']}",
        format_table(rows, columns),
        f"ours / naive net peak: {result['ours_over_naive']:.3f}x   "
        f"target ours <= {result['target_ratio']}x checkpoint: {'met' if result['meets_target'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker is not None:  # inside a fresh process started by measure()
        if args.checkpoint is None:
            raise SystemExit("--worker needs --checkpoint")
        print(json.dumps(measure_in_process(args.worker, args.checkpoint, DTYPES[args.dtype])))
        return None
    return run_and_report(args, run, report)


if __name__ == "__main__":
    main()
