"""Tokenizers: the Qwen2.5 tokenizer of a real checkpoint, or the small byte-level BPE shipped for the tiny preset.

Ola's tokenizer is Qwen2.5's plus five added special tokens (``<|ocr_start|>`` ... ``<|mm_pad|>``); the tiny
tokenizer has the same special tokens (ChatML, end of text, Ola's additions) on a 1000-token byte-level BPE, so prompts
are built by the same code at both sizes. Rebuild it with ``python -m ola_model.tokenizer OUT_DIR``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from ola_model.errors import CheckpointError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
OLA_ADDED_TOKENS = ("<|ocr_start|>", "<|ocr_end|>", "<|face_start|>", "<|face_end|>", "<|mm_pad|>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *OLA_ADDED_TOKENS)
TINY_VOCAB_SIZE = 1000

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (never a hub download)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory {path} does not exist")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer peeks at config.json, whose model_type it does not know
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def tiny_tokenizer_dir() -> Path:
    return Path(str(resources.files("ola_model") / "assets" / "tiny-tokenizer"))


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the tiny preset, shipped with the package."""
    return load_tokenizer(tiny_tokenizer_dir())


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end generation: ``<|im_end|>`` and ``<|endoftext|>``."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise CheckpointError(f"tokenizer lacks {IM_END} or {ENDOFTEXT}")
    return ids


# ---------------------------------------------------------------------------------------------- tiny tokenizer
_WORDS = """
a an the this that these those is are was were be been has have had do does did can could will would should may
what which who where when why how many much more less most least first second third last next before after
and or but not no yes of in on at to from with without by for about above below left right top bottom middle center
between behind front inside outside near far up down over under into onto through while during then than as so if
i you he she it we they me him her us them my your his its our their there here one two three four five six seven
eight nine ten eleven twelve zero number numbers count counted color colour colors shape shapes size big small large
tiny huge long short tall wide narrow red green blue yellow orange purple pink brown black white gray grey cyan
magenta circle circles square squares triangle triangles rectangle star stars dot dots line lines ring cross heart
diamond image picture photo video frame frames clip scene moving moves move moved moving toward away appears appear
disappear sound sounds tone tones beep beeps chord chords noise burst bursts music speech spoken voice voices say
says said word words text letter letters read write written answer question please give result results asr given
audio listen hear heard loud quiet high low pitch fast slow speed once twice times repeated rising falling play
played plays start end begin ending beginning narrator narration tell tells told describe description caption
object objects thing things color-coded background foreground rendered drawn shows show showing see seen look
user assistant system helpful you are model ola omni language vision hello world good bad yes no true false ok
""".split()


def _tiny_corpus() -> list[str]:
    """A deterministic corpus covering the words of the synthetic training world and plain English glue."""
    lines = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 12)]
    for a, b in itertools.product(_WORDS[:80], ("red", "blue", "circle", "square", "two", "three")):
        lines.append(f"{a} {b}. {a.capitalize()} {b}? {b} {a}, {a}!")
    lines += [f"{n} {n * 7 % 100} {n}.{n % 10} #{n}" for n in range(200)]
    lines += ["You are a helpful assistant.", "Please give the ASR results of the given speech."]
    lines += ["ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,:;!?'\"()-"]
    return lines


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (deterministic) with Ola's special tokens at ids 0..7."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
        model_max_length=16384,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny preset's tokenizer.")
    parser.add_argument("out", type=Path, nargs="?", default=tiny_tokenizer_dir())
    args = parser.parse_args(argv)
    tok = train_tiny_tokenizer()
    tok.save_pretrained(args.out)
    print(f"wrote a {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
