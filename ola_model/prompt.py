"""Prompt assembly: ChatML text with ``<image>`` / ``<speech>`` placeholders, and splicing of embedding blocks.

Ola's order (reference §4.2): placeholders are filled left to right, the first ``len(vision_blocks)`` of them with
image/video blocks and the rest with speech blocks, whatever each placeholder's text. So ``<speech><image>`` (a video
with its audio) puts the video first, then the audio, which is the order the checkpoint was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ola_model.errors import InputError, LimitError

IMAGE_PLACEHOLDER = "<image>"
SPEECH_PLACEHOLDER = "<speech>"
IMAGE_TOKEN_INDEX = -300
SPEECH_TOKEN_INDEX = -200
IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."
ASR_PROMPT = "Please give the ASR results of the given speech."
_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(SPEECH_PLACEHOLDER)})")
_PLACEHOLDER_IDS = {IMAGE_PLACEHOLDER: IMAGE_TOKEN_INDEX, SPEECH_PLACEHOLDER: SPEECH_TOKEN_INDEX}


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def user_content(
    question: str,
    num_images: int = 0,
    video: bool = False,
    audio: bool = False,
    spoken_question: bool = False,
) -> str:
    """The user turn in the layouts Ola's inference uses.

    Args:
        question: the text question ("" for a spoken question or an instruction-free clip).
        num_images: number of still images.
        video: a video is attached; with ``audio`` it is a video with its audio track (``<speech><image>``).
        audio: an audio clip (or the video's audio) is attached.
        spoken_question: the audio *is* the question, about the image(s) (``User's question in speech:``).
    """
    if video and num_images:
        raise InputError("a request takes images or one video, not both")
    if spoken_question:
        if not audio or not (num_images or video):
            raise InputError("a spoken question needs an audio clip and an image or video to ask about")
        return IMAGE_PLACEHOLDER + "\n" + "User's question in speech: " + SPEECH_PLACEHOLDER + "\n" + question
    if video:
        return (SPEECH_PLACEHOLDER if audio else "") + IMAGE_PLACEHOLDER + "\n" + question
    head = (IMAGE_PLACEHOLDER + "\n") * num_images + ((SPEECH_PLACEHOLDER + "\n") if audio else "")
    return head + question


def chatml(messages: Sequence[Message], system: str | None = SYSTEM_PROMPT, add_generation_prompt: bool = True) -> str:
    """Render messages in Qwen's ChatML (the ``qwen_1_5`` template of Ola)."""
    parts = []
    if system is not None and (not messages or messages[0].role != "system"):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        if m.role not in ("system", "user", "assistant"):
            raise InputError(f"message role must be system, user or assistant, got {m.role!r}")
        parts.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """Tokenize ``text``, placeholders becoming ``IMAGE_TOKEN_INDEX`` / ``SPEECH_TOKEN_INDEX`` (no BOS)."""
    ids: list[int] = []
    for piece in _SPLIT.split(text):
        if piece in _PLACEHOLDER_IDS:
            ids.append(_PLACEHOLDER_IDS[piece])
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def placeholder_positions(ids: Sequence[int]) -> list[int]:
    return [i for i, t in enumerate(ids) if t in (IMAGE_TOKEN_INDEX, SPEECH_TOKEN_INDEX)]


def prompt_length(ids: Sequence[int], block_lengths: Sequence[int]) -> int:
    """Embeddings the prompt occupies once each placeholder is replaced by its block."""
    return len(ids) - len(block_lengths) + sum(block_lengths)


def assemble_embeddings(
    ids: Sequence[int],
    vision_blocks: Sequence[torch.Tensor],
    speech_blocks: Sequence[torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    max_context: int | None = None,
    reserve: int = 0,
) -> torch.Tensor:
    """Splice embedding blocks into a tokenized prompt.

    Args:
        ids: token ids with placeholders (from :func:`tokenize_prompt`).
        vision_blocks: image/video blocks (N_i, C), filling the first placeholders in order.
        speech_blocks: speech blocks (N_j, C), filling the remaining placeholders in order.
        embed: token ids (L,) -> embeddings (L, C) (the LLM's embedding table).
        max_context: the context limit; ``reserve`` positions are kept free for generation.
    Returns:
        (L, C) input embeddings with plain sequential positions.
    Raises:
        InputError: placeholders and blocks disagree in number.
        LimitError: the prompt (+ reserve) exceeds ``max_context``. Nothing is truncated silently.
    """
    positions = placeholder_positions(ids)
    blocks = list(vision_blocks) + list(speech_blocks)
    if len(positions) != len(blocks):
        raise InputError(
            f"the prompt has {len(positions)} media placeholders but {len(vision_blocks)} image/video and "
            f"{len(speech_blocks)} speech inputs were given"
        )
    total = prompt_length(ids, [b.shape[0] for b in blocks])
    if max_context is not None and total + reserve > max_context:
        raise LimitError(
            "prompt length in tokens" + (f" (+ {reserve} reserved for the answer)" if reserve else ""),
            total + reserve,
            max_context,
            "use fewer video frames, shorter audio or smaller images",
        )
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    pieces: list[torch.Tensor] = []
    start = 0
    for pos, block in zip(positions, blocks, strict=True):
        if pos > start:
            pieces.append(embed(ids_t[start:pos]))
        pieces.append(block)
        start = pos + 1
    if start < len(ids):
        pieces.append(embed(ids_t[start:]))
    dtype = pieces[0].dtype if pieces else torch.float32
    return torch.cat([p.to(dtype) for p in pieces])  # (L, C)
