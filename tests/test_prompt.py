"""Prompt layouts and splicing in Ola's order."""

import pytest
import torch

from ola_model import InputError, LimitError
from ola_model.prompt import (
    IMAGE_TOKEN_INDEX,
    SPEECH_TOKEN_INDEX,
    Message,
    assemble_embeddings,
    chatml,
    tokenize_prompt,
    user_content,
)


def test_user_turn_layouts_match_olas_inference():
    assert user_content("What is it?", num_images=1) == "<image>\nWhat is it?"
    assert user_content("Transcribe.", audio=True) == "<speech>\nTranscribe."
    assert user_content("What happens?", video=True, audio=True) == "<speech><image>\nWhat happens?"
    assert user_content("What happens?", video=True) == "<image>\nWhat happens?"
    assert user_content("", num_images=1, audio=True, spoken_question=True) == (
        "<image>\nUser's question in speech: <speech>\n"
    )
    assert user_content("Compare.", num_images=2) == "<image>\n<image>\nCompare."
    with pytest.raises(InputError):
        user_content("x", num_images=1, video=True)


def test_chatml_with_the_default_system_prompt():
    text = chatml([Message("user", "hi")])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    multi = chatml([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
    assert multi.count("<|im_start|>") == 5 and multi.endswith("<|im_start|>assistant\n")


def test_placeholders_become_negative_ids_and_text_is_tokenized_unchanged(tiny_tok):
    text = chatml([Message("user", user_content("What happens?", video=True, audio=True))])
    ids = tokenize_prompt(text, tiny_tok)
    assert ids.count(SPEECH_TOKEN_INDEX) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids.index(SPEECH_TOKEN_INDEX) + 1 == ids.index(IMAGE_TOKEN_INDEX)
    plain = [i for i in ids if i >= 0]
    assert tiny_tok.decode(plain) == text.replace("<speech>", "").replace("<image>", "")
    assert tiny_tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens stay single tokens


def test_vision_blocks_fill_the_first_placeholders_whatever_their_text():
    """`<speech><image>`: the video block goes first, the audio block second (the checkpoint's order)."""
    ids = [5, SPEECH_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 6, 7]
    video = torch.full((3, 4), 1.0)
    speech = torch.full((2, 4), 2.0)

    def embed(t):
        return t.float()[:, None].expand(-1, 4) * 100

    out = assemble_embeddings(ids, [video], [speech], embed)
    assert out.shape == (1 + 3 + 2 + 2, 4)
    assert out[0, 0] == 500 and (out[1:4] == 1).all() and (out[4:6] == 2).all() and out[6, 0] == 600


def test_placeholder_count_must_match_the_blocks():
    with pytest.raises(InputError, match="2 media placeholders"):
        assemble_embeddings([IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], [torch.zeros(1, 4)], [], lambda t: t)


def test_a_prompt_over_the_context_is_an_error_never_a_truncation():
    block = torch.zeros(100, 4)
    with pytest.raises(LimitError, match="limit of 64"):
        assemble_embeddings([1, IMAGE_TOKEN_INDEX, 2], [block], [], lambda t: torch.zeros(len(t), 4), max_context=64)
    with pytest.raises(LimitError, match="reserved"):
        assemble_embeddings([1, 2, 3], [], [], lambda t: torch.zeros(len(t), 4), max_context=10, reserve=8)
