"""How fast can the tiny recipe's LLM learn the synthetic scene questions, given one kind of image tokens or another?

    .venv/bin/python -m bench.scene_qa_probe [--arms cells,encoder] [--steps 900] [--turns 6] [--checkpoint DIR]
        [--vit-patches DATA] [--test 1000] [--json OUT]

A diagnostic for the image-QA plateau of the tiny recipe (``ola_model/assets/demo-model/TRAINING.md``). Each arm
trains a fresh Qwen2 decoder of the tiny-demo LLM's shape (128 wide, 4 layers, 4 heads, 2 KV heads) on the same
scenes and questions (``workflows.data.scenes``), with the recipe's optimiser settings (AdamW, warmup 10%, cosine,
batch 16, clip 1.0), and scores exact answers on fresh scenes per question kind. Words are whole tokens (no
tokenizer), and the loss is on the answer word only. The arms differ only in the image tokens:

- ``cells``: a perfect encoder. The picture is an 8 x 8 grid; a cell holding a shape is the sum of learned embeddings
  of its colour, kind and size, any other cell one learned embedding of the background colour (64 tokens).
- ``encoder``: the image block of a real ViT + projector (``--checkpoint``, or the tiny-demo model at random
  initialisation, its patch embedding set from ``--vit-patches`` as ``model.init.vit_patches`` does), frozen, from
  the scene rendered at 160-224 px (low-res view at 160 x 160).

``--turns N`` asks N different questions about each scene in one sequence (as ``ola data synth --qa-turns``).
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench._common import format_table, write_results
from workflows.data import scenes as sc

GRID = 8
SIZES = ((192, 192), (224, 160), (160, 224), (160, 160))
LOWRES_AREA = 160 * 160
KINDS = ("background", "big/small", "colour", "count", "exists", "position", "shape")
LLM = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4}


def question_kind(question: str) -> str:
    if question.startswith("How many"):
        return "count"
    if "big or small" in question:
        return "big/small"
    if "background" in question:
        return "background"
    if question.startswith("What color"):
        return "colour"
    if "shape" in question:
        return "shape"
    if question.startswith("Where"):
        return "position"
    return "exists"


class Vocab:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        for word in ("<pad>", "<img>", "</img>", "<q>", "<a>"):
            self(word)

    def __call__(self, word: str) -> int:
        return self.ids.setdefault(word, len(self.ids))


def cell_tokens(scene: sc.Scene, rng: np.random.Generator, vocab: Vocab) -> list[tuple[int, ...]]:
    """The ``cells`` arm's picture: GRID x GRID tokens, each one to three vocabulary ids to sum."""
    cells: list[tuple[int, ...]] = [(vocab(f"bg:{scene.background}"),)] * (GRID * GRID)
    for g in scene.groups:
        fx0, fy0, fx1, fy1 = sc.REGIONS[g.position]
        grid = sc.grid_cells(fx0, fy0, fx1, fy1)
        for i in rng.choice(len(grid), size=g.count, replace=False):
            cx, cy, _ = grid[int(i)]
            cell = min(GRID - 1, int(cy * GRID)) * GRID + min(GRID - 1, int(cx * GRID))
            cells[cell] = (vocab(f"colour:{g.colour}"), vocab(f"kind:{g.kind}"), vocab(f"size:{g.size}"))
    return cells


def fresh_model(seed: int = 0):
    """The tiny-demo model (the recipe's shape) at random initialisation."""
    from ola_model.config import OlaConfig
    from ola_model.model import build_model

    llm = {**LLM, "num_key_value_heads": 2}
    return build_model(OlaConfig.from_name("tiny").with_overrides({"name": "tiny-demo", "llm": llm}), seed=seed)


def highres_tokens(model, image: torch.Tensor) -> torch.Tensor:
    """One normalised view (3, H, W) -> its pooled tokens at LLM width, row-major ((H/32)(W/32), C), no newlines."""
    p = model.vision_tower.patch_size
    h, w = image.shape[-2] // p, image.shape[-1] // p
    rows = model.mm_projector(model.vision_tower([image])[0][None], h, w)[0].reshape(h // 2, w // 2 + 1, -1)
    return rows[:, :-1].reshape(-1, rows.shape[-1])  # the newline closes each row


def make_encoder(
    checkpoint: Path | None, tokens: str = "block", vit_patches: Path | None = None
) -> Callable[[sc.Scene, np.random.Generator], torch.Tensor]:
    """The ``encoder`` arm's picture: a frozen model's image block (positions, LLM width), or with ``tokens`` =
    "highres" only the pooled tokens of its high-res view (no low-res view, row newlines or begin / sep / end)."""
    from ola_model.checkpoint.ola_format import load_checkpoint
    from ola_model.processing.image import process_image

    if checkpoint is None:
        model = fresh_model(seed=0).eval()
        if vit_patches is not None:  # the patch embedding as model.init.vit_patches sets it
            from workflows.training.patch_init import init_patch_embedding

            init_patch_embedding(model, vit_patches)
    else:
        model = load_checkpoint(checkpoint, dtype=torch.float32)

    def encode(scene: sc.Scene, rng: np.random.Generator) -> torch.Tensor:
        views = process_image(sc.render_scene(scene, rng), lowres_area=LOWRES_AREA)
        with torch.no_grad():
            if tokens == "block":
                return model.encode_images([(views.lowres, views.highres)])[0]
            return highres_tokens(model, views.highres)

    return encode


Sample = tuple[list[Any], list[tuple[int, int, str]]]  # tokens (id tuples or feature rows), (position, answer, kind)


def make_sample(arm: str, rng: np.random.Generator, vocab: Vocab, turns: int, encode) -> Sample:
    scene = sc.sample_scene(rng)
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    scene = sc.Scene(width, height, scene.background, scene.groups)
    picture: list[Any] = cell_tokens(scene, rng, vocab) if arm == "cells" else list(encode(scene, rng))
    tokens: list[Any] = [(vocab("<img>"),), *picture, (vocab("</img>"),)]
    answers = []
    for question, answer in sc.scene_questions(scene, rng, turns):
        words = question.lower().replace("?", " ?").split()
        tokens += [(vocab("<q>"),), *[(vocab(w),) for w in words], (vocab("<a>"),)]
        answers.append((len(tokens) - 1, vocab(answer), question_kind(question)))
        tokens.append((vocab(answer),))
    return tokens, answers


def forward(model: Qwen2ForCausalLM, batch: list[Sample]) -> tuple[torch.Tensor, list[tuple]]:
    """The logits (B, L, V) of a left-padded batch, and its supervised (row, column, answer, kind)."""
    table = model.get_input_embeddings()
    width = table.weight.shape[1]
    L = max(len(tokens) for tokens, _ in batch)
    rows = []
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    targets = []
    for i, (tokens, answers) in enumerate(batch):
        pad = L - len(tokens)
        vectors = [table(torch.tensor(t)).sum(0) if isinstance(t, tuple) else t.to(table.weight.dtype) for t in tokens]
        rows.append(torch.cat([torch.zeros(pad, width), torch.stack(vectors)]))
        mask[i, pad:] = 1
        targets += [(i, pad + p, a, k) for p, a, k in answers]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return model(inputs_embeds=torch.stack(rows), attention_mask=mask, position_ids=positions).logits, targets


def run_arm(arm: str, args: argparse.Namespace, encode) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    vocab = Vocab()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    train = [make_sample(arm, rng, vocab, args.turns, encode) for _ in range(args.steps * args.batch)]
    test = [make_sample(arm, rng, vocab, 1, encode) for _ in range(args.test)]
    data_s = time.perf_counter() - start
    config = Qwen2Config(vocab_size=max(512, len(vocab.ids) + 64), num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=4096, tie_word_embeddings=False, **LLM)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = math.ceil(0.1 * args.steps)
    start = time.perf_counter()
    for step in range(args.steps):
        factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimiser.param_groups:
            group["lr"] = args.lr * factor
        logits, targets = forward(model, train[step * args.batch : (step + 1) * args.batch])
        rows, cols, answers, _ = zip(*targets, strict=True)
        loss = torch.nn.functional.cross_entropy(logits[list(rows), list(cols)], torch.tensor(answers))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    train_s = time.perf_counter() - start
    correct: dict[str, list[bool]] = collections.defaultdict(list)
    with torch.no_grad():
        for i in range(0, len(test), 100):
            logits, targets = forward(model, test[i : i + 100])
            for row, col, answer, kind in targets:
                correct[kind].append(int(logits[row, col].argmax()) == answer)
    every = [c for v in correct.values() for c in v]
    result = {"arm": arm, "all": sum(every) / len(every), "final_loss": loss.item(), "data_s": data_s}
    result.update({kind: sum(correct[kind]) / len(correct[kind]) for kind in KINDS if correct[kind]})
    result["train_s"] = train_s
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="cells,encoder", help="comma-separated: cells, encoder (default both)")
    p.add_argument("--steps", type=int, default=900, help="optimiser steps per arm (default 900, the recipe's 0v)")
    p.add_argument("--batch", type=int, default=16, help="scenes per step (default 16)")
    p.add_argument("--turns", type=int, default=6, help="questions per training scene (default 6)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4, the recipe's 0v)")
    p.add_argument("--test", type=int, default=1000, help="fresh test scenes, one question each (default 1000)")
    p.add_argument(
        "--checkpoint", type=Path, help="encoder arm: a model whose ViT + projector to use (default: random)"
    )
    p.add_argument(
        "--encoder-tokens",
        choices=("block", "highres"),
        default="block",
        help="encoder arm: the whole image block, or only the high-res view's pooled tokens (default block)",
    )
    p.add_argument(
        "--vit-patches",
        type=Path,
        metavar="DATA",
        help="encoder arm at random initialisation: the patch embedding from this dataset's patches, whitened "
        "(as a training config's model.init.vit_patches)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.vit_patches is not None and args.checkpoint is not None:
        p.error("--vit-patches sets up a randomly initialised encoder; it does not go with --checkpoint")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - {"cells", "encoder"})
    if unknown or not arms:
        p.error(f"--arms: unknown arm(s) {unknown}; choose from cells, encoder")
    torch.set_num_threads(args.threads)
    encode = make_encoder(args.checkpoint, args.encoder_tokens, args.vit_patches) if "encoder" in arms else None
    results = [run_arm(arm, args, encode) for arm in arms]
    columns = [("arm", "arm"), ("all", "all"), *[(k, k) for k in KINDS], ("final_loss", "loss"), ("train_s", "s")]
    print(format_table(results, columns))
    write_results(args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
