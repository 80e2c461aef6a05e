"""Can the tiny ViT + projector tell the synthetic world's shapes apart, token by token?

    .venv/bin/python -m bench.vision_token_probe readout [--checkpoint DIR ...] [--vit-patches DATA ...]
        [--images 3000] [--json OUT]
    .venv/bin/python -m bench.vision_token_probe supervise [--steps 600] [--lr 1e-3] [--scale 1] [--json OUT]

A diagnostic for the tiny recipe's image-QA plateau (``ola_model/assets/demo-model/TRAINING.md``), next to
``bench/scene_qa_probe.py``. Every object question names a shape's kind or asks for it, so the LLM can only answer
them if an image token says which kind it holds.

- ``readout``: one shape (any kind and colour, radius 6-14 px) centred in the first 32 x 32 pooled token of a 64 x 64
  gray picture. Classifiers trained on 3/4 of the pictures name the kind and the colour of the other quarter from
  that one token of the image block: a linear one (what an attention key can read) and a 2-layer MLP, for the
  tiny-demo ViT + projector at random initialisation, the shipped demo model, any ``--checkpoint`` and a random one
  whose patch embedding is set from ``--vit-patches`` (as ``model.init.vit_patches`` does). The picture's own pixels
  (the token's 32 x 32 x 3) are the reference.
- ``supervise``: the most direct teacher there is. A linear head on each high-res pooled token of a fresh tiny-demo
  ViT + projector learns, on rendered scenes (160-224 px, ``--scale`` times larger), the kind, colour and size of the
  shape whose centre lies in that token, and whether there is one, with AdamW (warmup 10 %, cosine, clip 1.0).
  Reported: the kind and colour accuracy on the object tokens of 200 held-out scenes, every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from bench._common import format_table, write_results
from bench.scene_qa_probe import SIZES, fresh_model, highres_tokens
from ola_model.demo import SHIPPED_DEMO
from ola_model.processing.image import image_to_tensor, process_image
from workflows.data import scenes as sc
from workflows.data.world import BACKGROUNDS, COLOURS, SHAPES

TOKEN = 32  # pixels per pooled token side (16-px patches, 2 x 2 pooling)
PALETTE = sorted(set(COLOURS) | set(BACKGROUNDS))  # colour classes: a shape's or, for empty tokens, the background's


# --------------------------------------------------------------------------------------------------- readout
def single_shapes(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` 64 x 64 gray pictures, one shape near the centre of the top-left token: (images, kinds, colours)."""
    images, kinds, colours = [], [], []
    names = [c for c in COLOURS if c != "gray"]
    for _ in range(count):
        img = Image.new("RGB", (2 * TOKEN, 2 * TOKEN), BACKGROUNDS["gray"])
        kind, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(names)))
        cx, cy = TOKEN / 2 + rng.uniform(-2, 2, size=2)
        sc.draw_shape(ImageDraw.Draw(img), SHAPES[kind], cx, cy, rng.uniform(6, 14), COLOURS[names[colour]])
        images.append(image_to_tensor(img))
        kinds.append(kind)
        colours.append(colour)
    return torch.stack(images), torch.tensor(kinds), torch.tensor(colours)


def held_out_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, mlp: bool, seed: int = 0) -> float:
    """Train a classifier on the first 3/4 of (x, y) (standardised features, full batch, Adam) and score the rest."""
    n = int(0.75 * len(y))
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    torch.manual_seed(seed)
    width = x.shape[1]
    if mlp:
        head: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(width, 256), torch.nn.GELU(), torch.nn.Linear(256, classes)
        )
    else:
        head = torch.nn.Linear(width, classes)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3 if mlp else 1e-2, weight_decay=1e-4)
    for _ in range(500):
        loss = F.cross_entropy(head(x[:n]), y[:n])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return (head(x[n:]).argmax(1) == y[n:]).float().mean().item()


def readout(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ola_model.checkpoint.ola_format import load_checkpoint

    images, kinds, colours = single_shapes(args.images, np.random.default_rng(args.seed))
    n_colours = int(colours.max()) + 1
    features = {"pixels of the token": images[:, :, :TOKEN, :TOKEN].reshape(len(images), -1)}
    encoders = {
        "random initialisation": fresh_model(args.seed),
        "demo model": load_checkpoint(SHIPPED_DEMO, dtype=torch.float32),
    }
    encoders.update({str(path): load_checkpoint(path, dtype=torch.float32) for path in args.checkpoint})
    for data in args.vit_patches:
        from workflows.training.patch_init import init_patch_embedding

        model = fresh_model(args.seed)
        init_patch_embedding(model, data)
        encoders[f"random, patch embedding from {data}"] = model
    for name, model in encoders.items():
        with torch.no_grad():
            features[name] = torch.stack([highres_tokens(model.eval(), image)[0] for image in images])
    rows = []
    for name, x in features.items():
        rows.append({
            "tokens": name,
            "kind_linear": held_out_accuracy(x, kinds, len(SHAPES), mlp=False),
            "kind_mlp": held_out_accuracy(x, kinds, len(SHAPES), mlp=True),
            "colour_linear": held_out_accuracy(x, colours, n_colours, mlp=False),
        })  # fmt: skip
    print(f"{args.images} pictures, 3/4 to train; chance: kind {1 / len(SHAPES):.2f}, colour {1 / n_colours:.2f}")
    print(format_table(rows, [("tokens", "tokens"), ("kind_linear", "kind (linear)"), ("kind_mlp", "kind (MLP)"),
                              ("colour_linear", "colour (linear)")]))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------- supervise
def labelled_scene(rng: np.random.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A rendered scene's high-res view and per-token labels (T, 4): kind (-1: none), colour, size (-1), object."""
    scene = sc.sample_scene(rng)
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    width, height = int(width * scale) // TOKEN * TOKEN, int(height * scale) // TOKEN * TOKEN
    scene = sc.Scene(width, height, scene.background, scene.groups)
    img, placed = sc.layout_scene(scene, rng)
    view = process_image(img, lowres_area=TOKEN * TOKEN).highres  # sides are multiples of 32: the picture as is
    gw, gh = width // TOKEN, height // TOKEN
    labels = torch.tensor([[-1, PALETTE.index(scene.background), -1, 0]]).repeat(gw * gh, 1)
    for shape in placed:
        t = min(gh - 1, int(shape.cy // TOKEN)) * gw + min(gw - 1, int(shape.cx // TOKEN))
        g = shape.group
        labels[t] = torch.tensor([SHAPES.index(g.kind), PALETTE.index(g.colour), int(g.size == "big"), 1])
    return view, labels


def supervise(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = fresh_model(args.seed)
    k, c = len(SHAPES), len(PALETTE)
    head = torch.nn.Linear(model.mm_projector.proj2.out_features, k + c + 2 + 2)  # kind, colour, size, object
    params = [*model.vision_tower.parameters(), *model.mm_projector.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    test = [labelled_scene(rng, args.scale) for _ in range(args.test)]

    def logits_and_labels(batch):
        z = head(torch.cat([highres_tokens(model, view) for view, _ in batch]))
        return z, torch.cat([labels for _, labels in batch])

    def loss_of(z, y):
        obj = y[:, 3] == 1
        loss = F.cross_entropy(z[:, k : k + c], y[:, 1]) + F.cross_entropy(z[:, -2:], y[:, 3])
        if obj.any():
            loss = loss + F.cross_entropy(z[obj, :k], y[obj, 0]) + F.cross_entropy(z[obj, k + c : k + c + 2], y[obj, 2])
        return loss

    rows = []
    warmup = math.ceil(0.1 * args.steps)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        factor = min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        for group in optimiser.param_groups:
            group["lr"] = args.lr * factor
        loss = loss_of(*logits_and_labels([labelled_scene(rng, args.scale) for _ in range(args.batch)]))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                z, y = logits_and_labels(test)
                obj = y[:, 3] == 1
                rows.append({
                    "step": step,
                    "train_loss": loss.item(),
                    "kind": (z[obj, :k].argmax(1) == y[obj, 0]).float().mean().item(),
                    "colour": (z[obj, k : k + c].argmax(1) == y[obj, 1]).float().mean().item(),
                    "object_tokens": int(obj.sum()),
                    "s": time.perf_counter() - start,
                })  # fmt: skip
    print(f"object tokens of {args.test} held-out scenes (scale {args.scale}); chance: kind {1 / k:.2f}")
    print(format_table(rows, [("step", "step"), ("train_loss", "train loss"), ("kind", "kind"),
                              ("colour", "colour"), ("object_tokens", "object tokens"), ("s", "s")]))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("readout", "supervise"))
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="readout: also this model's tokens")
    p.add_argument(
        "--vit-patches",
        type=Path,
        action="append",
        default=[],
        metavar="DATA",
        help="readout: also a random ViT whose patch embedding is set from this dataset (model.init.vit_patches)",
    )
    p.add_argument("--images", type=int, default=3000, help="readout: pictures (default 3000)")
    p.add_argument("--steps", type=int, default=600, help="supervise: optimiser steps (default 600)")
    p.add_argument("--batch", type=int, default=16, help="supervise: scenes per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="supervise: peak learning rate (default 1e-3)")
    p.add_argument("--scale", type=float, default=1.0, help="supervise: picture size factor (default 1: 160-224 px)")
    p.add_argument("--test", type=int, default=200, help="supervise: held-out scenes (default 200)")
    p.add_argument("--every", type=int, default=100, help="supervise: score every N steps (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.scale <= 0 or args.steps < 1 or args.images < 8:
        p.error("--scale must be > 0, --steps >= 1, --images >= 8")
    torch.set_num_threads(args.threads)
    rows = readout(args) if args.mode == "readout" else supervise(args)
    write_results(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
