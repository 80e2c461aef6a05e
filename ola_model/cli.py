"""The ``ola`` command line.

Built-in commands: ``generate`` (stream an answer), ``inspect`` (parameter counts and checkpoint keys), ``init``
(write a randomly initialised checkpoint of a preset) and ``demo`` (the README's main job). Other packages add
commands through the ``ola.cli`` entry-point group: each entry is a function ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import time
import wave
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch

from ola_model.errors import OlaError

log = logging.getLogger("ola")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: Ola's infer.py)")
    g.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
    g.add_argument("--top-k", type=int, default=20, help="0 = off (default 20)")
    g.add_argument("--top-p", type=float, default=None, help="off by default, as in Ola")
    g.add_argument("--repetition-penalty", type=float, default=1.05)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _add_media(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", type=Path, help="a video file; its audio track is used too unless --no-video-audio")
    p.add_argument("--audio", type=Path, help="an audio file (any rate and channels; up to 12.5 minutes)")
    p.add_argument("--no-video-audio", action="store_true", help="ignore the video's audio track")
    p.add_argument("--spoken-question", action="store_true", help="the audio is the question about the image/video")
    p.add_argument("--max-frames", type=int, default=None, help="video frames to sample (default and limit: 64)")


def _pipeline(args: argparse.Namespace):
    from ola_model.demo import demo_checkpoint_dir, has_demo_model
    from ola_model.inference import OlaPipeline

    if args.checkpoint is not None:
        return OlaPipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], progress=True)
    if args.preset is None:
        if has_demo_model():
            return OlaPipeline.from_checkpoint(demo_checkpoint_dir(), device=args.device)
    preset = args.preset or "tiny"
    log.warning("no --checkpoint (and no demo model): a randomly initialised %s model, its answers are noise", preset)
    return OlaPipeline.from_preset(preset, seed=args.init_seed, device=args.device)


def _request(args: argparse.Namespace):
    from ola_model.inference import OlaRequest

    return OlaRequest(
        question=args.question,
        images=args.image,
        video=args.video,
        audio=args.audio,
        use_video_audio=not args.no_video_audio,
        spoken_question=args.spoken_question,
        max_video_frames=args.max_frames,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from ola_model.generation import SamplingParams

    pipe = _pipeline(args)
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    request = _request(args)
    start = time.perf_counter()
    prompt = pipe.prepare(request, reserve=params.max_new_tokens)
    prepared = time.perf_counter()
    from ola_model.generation import stream_text

    n = 0
    first = None
    for delta in stream_text(
        pipe.model, prompt.embeds, pipe.tokenizer, params, pipe.stop_ids, pipe.config.limits.max_context
    ):
        first = first or time.perf_counter()
        n += 1
        sys.stdout.write(delta)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    counts = ", ".join(f"{k} {v}" for k, v in prompt.num_tokens.items() if v)
    ttft = f"{(first - start) * 1e3:.0f} ms" if first else "n/a"
    print(
        f"[prompt: {counts} tokens; prepare {(prepared - start) * 1e3:.0f} ms; first text {ttft}; "
        f"{n} deltas in {(end - prepared):.2f} s]",
        file=sys.stderr,
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ola_model.checkpoint.name_map import ola_checkpoint_name
    from ola_model.checkpoint.ola_format import read_config
    from ola_model.checkpoint.strict import named_tensors
    from ola_model.config import OlaConfig
    from ola_model.model import build_model

    config = read_config(args.checkpoint) if args.checkpoint else OlaConfig.from_name(args.preset)
    model = build_model(config, device="meta")
    counts = model.part_num_params()
    print(f"Ola preset {config.name!r}")
    width = max(len(k) for k in counts)
    for part, n in counts.items():
        print(f"  {part:<{width}}  {n:>15,}")
    print(f"  {'total':<{width}}  {sum(counts.values()):>15,}")
    if args.checkpoint:
        from ola_model.checkpoint.ola_format import verify_checkpoint

        report = verify_checkpoint(args.checkpoint)  # raises CheckpointError naming every bad key
        print(f"\n{args.checkpoint}: all keys and shapes match ({report.loaded} tensors, {report.bytes / 1e9:.2f} GB)")
        for key, reason in sorted(report.skipped.items()):
            print(f"  skipped {key}: {reason}")
    if not args.no_keys:
        tensors = named_tensors(model)
        print(f"\ncheckpoint keys ({len(tensors)}):")
        for name, t in tensors.items():
            dtype = "float32" if name.startswith("speech_encoder.beats_model.") else "model dtype"
            print(f"  {ola_checkpoint_name(name)}  {list(t.shape)}  {dtype}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from ola_model.checkpoint.ola_format import save_checkpoint
    from ola_model.inference import OlaPipeline

    pipe = OlaPipeline.from_preset(args.preset, seed=args.init_seed)
    save_checkpoint(pipe.model, args.out, tokenizer=pipe.tokenizer, overwrite=args.overwrite)
    print(f"wrote a randomly initialised {args.preset} checkpoint to {args.out}")
    return 0


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_demo_media(out: Path, question: str) -> tuple[Path, Path]:
    """A rendered picture of shapes and the question spoken by espeak-ng (a chord if espeak-ng is missing)."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    image = out / "shapes.png"
    img = Image.new("RGB", (640, 480), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 80, 220, 240), fill=(220, 40, 40))
    draw.rectangle((300, 120, 460, 280), fill=(40, 90, 220))
    draw.polygon([(520, 400), (600, 250), (630, 400)], fill=(40, 170, 60))
    draw.text((60, 420), "OLA", fill=(0, 0, 0))
    img.save(image)
    audio = out / "question.wav"
    try:
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(audio), question],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        log.warning("espeak-ng is not available (run `make system`); using a synthetic chord as the audio")
        t = np.arange(int(16000 * 2.0)) / 16000
        _write_wav(audio, 0.2 * sum(np.sin(2 * math.pi * f * t) for f in (262, 330, 392)), 16000)
    return image, audio


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the demo model (or a random tiny checkpoint), sample media, a streamed answer."""
    from ola_model.demo import demo_checkpoint_dir, has_demo_model

    out: Path = args.out
    if args.checkpoint is not None:
        ckpt = args.checkpoint
    elif has_demo_model() and args.preset is None:
        ckpt = demo_checkpoint_dir()
    else:
        ckpt = out / "tiny-checkpoint"
        if not (ckpt / "config.json").is_file():
            log.warning("no demo model: writing a randomly initialised tiny checkpoint (its answers are noise)")
            args.preset, args.overwrite = args.preset or "tiny", True
            args.out = ckpt
            cmd_init(args)
    image, audio = make_demo_media(out / "media", args.question)
    print(f"image: {image}\naudio: {audio} (the question, spoken)\nquestion: {args.question}\nanswer: ", end="")
    gen = argparse.Namespace(
        **{
            **vars(args),
            "checkpoint": ckpt,
            "image": [image],
            "audio": audio,
            "video": None,
            "no_video_audio": False,
            "spoken_question": False,
            "max_frames": None,
        }
    )
    return cmd_generate(gen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ola", description="Ola omni-modal model: local inference and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", type=Path, help="an Ola checkpoint directory (published layout or ours)")
        p.add_argument(
            "--preset",
            default=None,
            help="without --checkpoint: random weights of this preset (default: the shipped demo model)",
        )
        p.add_argument("--init-seed", type=int, default=0, help="seed of the random initialisation")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument(
            "--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32"
        )

    p = sub.add_parser("generate", help="stream the answer to a question about images / a video / audio")
    model_args(p)
    _add_media(p)
    _add_sampling(p)
    p.add_argument("question", help="the question (may be empty with --spoken-question)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="print each part's parameter count and the checkpoint keys")
    p.add_argument("--preset", default="ola-7b", help="a preset name (ola-7b, tiny)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="inspect a checkpoint directory: its config, and its keys verified (headers only)",
    )
    p.add_argument("--no-keys", action="store_true", help="only the parameter counts")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("demo", help="the main job: a tiny model answers a question about a picture and speech")
    model_args(p)
    _add_sampling(p)
    p.add_argument("--out", type=Path, default=Path(".cache/demo"))
    p.add_argument("question", nargs="?", default="Describe the image.")
    p.set_defaults(func=cmd_demo)

    for ep in entry_points(group="ola.cli"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # an optional part whose extras are not installed
            log.debug("ola: commands of %s unavailable: %s", ep.name, exc)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except OlaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
