"""Training batches: labels, placeholder layout, token estimates, splicing order, padding, loss, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ola_model import build_model
from ola_model.config import OlaConfig
from ola_model.prompt import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SPEECH_TOKEN_INDEX,
    Message,
    chatml,
    tokenize_prompt,
    user_content,
)
from workflows.data import DataFormatError, load_split
from workflows.training.batch import (
    DataError,
    LengthGroupedBatches,
    StageDataset,
    build_inputs,
    collate,
    lm_loss,
    mix_samples,
    move_placeholders_to_front,
    parse_sample,
    tokenize_conversation,
)
from workflows.training.trainability import apply_trainable

ALL_TASKS = ["caption", "image_qa", "ocr", "asr", "sound_qa", "spoken_image_qa", "video_qa", "video_audio_qa"]


@pytest.fixture(scope="module")
def dataset(data_root, tiny_tok, tiny_config) -> StageDataset:
    return StageDataset(data_root, dict.fromkeys(ALL_TASKS, 1.0), tiny_tok, tiny_config, max_video_frames=4)


def _example(dataset: StageDataset, task: str, nth: int = 0):
    indices = [i for i, s in enumerate(dataset.specs) if s.task == task]
    return dataset[indices[nth]]


def test_labels_cover_assistant_content_and_its_markers(tiny_tok) -> None:
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many are there?"},
        {"from": "gpt", "value": "two circles"},
    ]
    ids, labels = tokenize_conversation(conv, tiny_tok)
    assert len(ids) == len(labels)
    supervised = [lab for lab in labels if lab != IGNORE_INDEX]
    expected = "<|im_start|>\nred<|im_end|>\n<|im_start|>\ntwo circles<|im_end|>\n"
    assert tiny_tok.decode(supervised) == expected
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels, strict=True))
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    # Ola's own convention: the markers of every turn (system, user, assistant) are supervised too.
    _, all_markers = tokenize_conversation(conv, tiny_tok, label_all_turn_markers=True)
    decoded = tiny_tok.decode([lab for lab in all_markers if lab != IGNORE_INDEX])
    assert decoded == "<|im_start|>\n<|im_end|>\n" * 2 + expected[: expected.index("<|im_start|>", 1)] + (
        "<|im_start|>\n<|im_end|>\n" + expected[expected.index("<|im_start|>", 1) :]
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<image>\nHow many?", "<image>\nHow many?"),
        ("<speech>\nPlease transcribe.", "<speech>\nPlease transcribe."),
        ("<speech><image>\nWhat is it named?", "<speech>\n<image>\n\nWhat is it named?"),
        ("Compare <image> and <image> please", "<image>\n<image>\nCompare  and  please"),
        ("<image>\nUser's question in speech: <speech>\n", "<speech>\n<image>\nUser's question in speech:"),
        ("plain text", "plain text"),
    ],
)
def test_placeholders_move_to_the_front_like_olas_preprocess(value: str, expected: str) -> None:
    assert move_placeholders_to_front(value) == expected


@pytest.mark.parametrize(("num_images", "audio"), [(1, False), (0, True)])
def test_training_prompt_equals_the_inference_prompt(tiny_tok, num_images: int, audio: bool) -> None:
    question = "How many red circles are there?"
    human = user_content(question, num_images=num_images, audio=audio)
    ids, _ = tokenize_conversation([{"from": "human", "value": human}, {"from": "gpt", "value": "two"}], tiny_tok)
    prompt = tokenize_prompt(chatml([Message("user", human)]), tiny_tok)
    assert ids[: len(prompt)] == prompt


def test_estimated_tokens_are_exact_and_blocks_get_no_labels(dataset, tiny_model) -> None:
    assert len(dataset) == 13
    with torch.no_grad():
        for i in range(len(dataset)):
            ex = dataset[i]
            inputs = build_inputs(tiny_model, collate([ex]), max_length=4096)
            assert inputs.num_tokens == ex.est_tokens, ex.sample_id
            n_text_labels = sum(lab != IGNORE_INDEX for lab in ex.labels)
            assert int((inputs.labels != IGNORE_INDEX).sum()) == n_text_labels


def test_video_block_comes_before_audio_block(dataset, tiny_model) -> None:
    ex = _example(dataset, "video_audio_qa")
    placeholders = [t for t in ex.input_ids if t < 0]
    assert placeholders == [SPEECH_TOKEN_INDEX, IMAGE_TOKEN_INDEX]  # the text says <speech> first ...
    with torch.no_grad():
        inputs = build_inputs(tiny_model, collate([ex]), max_length=4096)
        video = tiny_model.encode_video(ex.video)
        audio = tiny_model.encode_audio(ex.audio.mel, ex.audio.wav_chunks)
    start = ex.input_ids.index(SPEECH_TOKEN_INDEX)
    second = start + video.shape[0] + (ex.input_ids.index(IMAGE_TOKEN_INDEX) - start - 1)
    row = inputs.inputs_embeds[0]
    # ... but the video block fills the first placeholder and the audio block the second (Ola's order, §4.2)
    torch.testing.assert_close(row[start : start + video.shape[0]], video)
    torch.testing.assert_close(row[second : second + audio.shape[0]], audio)


def test_batch_is_right_padded_with_sequential_positions(dataset, tiny_model) -> None:
    examples = [_example(dataset, "caption"), _example(dataset, "asr"), _example(dataset, "video_qa")]
    with torch.no_grad():
        inputs = build_inputs(tiny_model, collate(examples), max_length=4096)
    B, L, _ = inputs.inputs_embeds.shape
    lengths = [ex.est_tokens for ex in examples]
    assert (B, L) == (3, max(lengths))
    assert inputs.attention_mask.sum(1).tolist() == lengths
    assert torch.equal(inputs.position_ids, torch.arange(L).expand(B, L))
    for i, n in enumerate(lengths):
        assert torch.all(inputs.inputs_embeds[i, n:] == 0) and torch.all(inputs.labels[i, n:] == IGNORE_INDEX)
    with pytest.raises(ValueError, match="prompt length"):
        build_inputs(tiny_model, collate(examples), max_length=min(lengths) - 1)


def test_loss_is_token_mean_over_supervised_positions(dataset, tiny_model) -> None:
    examples = [_example(dataset, "image_qa"), _example(dataset, "sound_qa")]
    with torch.no_grad():
        inputs = build_inputs(tiny_model, collate(examples), max_length=4096)
        loss, n = lm_loss(tiny_model, inputs)
        logits = tiny_model(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids).logits
    targets = inputs.labels[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert n == int((targets != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(loss, expected)


def test_dummy_blocks_give_every_trainable_part_a_gradient(dataset, tiny_config) -> None:
    model = build_model(tiny_config, seed=1)
    for trainable in (("mm_projector", "speech_projector", "llm"), ("vision_tower", "mm_projector", "whisper")):
        apply_trainable(model, trainable)
        model.zero_grad(set_to_none=True)
        batch = collate([_example(dataset, "caption")])  # no audio in the batch
        inputs = build_inputs(model, batch, 4096, trainable)
        loss, _ = lm_loss(model, inputs)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (trainable, missing[:5])


def test_length_grouped_batches_are_deterministic_disjoint_and_resumable() -> None:
    lengths = [10, 50, 20, 40, 30, 60, 70, 5, 15]
    ranks = [LengthGroupedBatches(lengths, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # ceil(9 / 4): the order wraps around to whole steps
    epoch = [ranks[r].epoch_batches(0) for r in range(2)]
    seen = sorted(i for r in range(2) for b in epoch[r] for i in b)
    assert set(seen) == set(range(9)) and len(seen) == 12
    for step in range(3):  # within a step, longest first across ranks (one mega-batch here)
        step_lengths = [lengths[i] for r in range(2) for i in epoch[r][step]]
        assert step_lengths == sorted(step_lengths, reverse=True)
    again = LengthGroupedBatches(lengths, batch_size=2, world_size=2, rank=0, seed=3)
    stream = again.iter_from(0)
    first = [next(stream) for _ in range(7)]
    assert first[:3] == epoch[0]
    resumed = again.iter_from(4)
    assert [next(resumed) for _ in range(3)] == first[4:7]
    assert ranks[0].epoch_batches(1) != ranks[0].epoch_batches(0)


def test_mix_weights_subsample_and_repeat(data_root) -> None:
    samples = load_split(data_root, "train")
    mixed = mix_samples(samples, {"image_qa": 0.5, "asr": 2.0, "ocr": 1.0}, seed=0)
    tasks = [s["task"] for s in mixed]
    assert (tasks.count("image_qa"), tasks.count("asr"), tasks.count("ocr")) == (1, 4, 1)
    with pytest.raises(DataError, match=r"task 'speech_qa' has no samples; tasks present: \['asr'"):
        mix_samples(samples, {"speech_qa": 1.0})


def test_malformed_samples_are_clear_errors(data_root, tmp_path) -> None:
    base = {"id": "x1", "task": "image_qa", "image": "media/img/0000.png"}
    cases = [
        ({**base, "conversations": [{"from": "human", "value": "no placeholder"}]}, r"x1: 0 <image> placeholder"),
        ({**base, "conversations": [{"from": "human", "value": "<image><speech>"}]}, "no audio, audio_q or video"),
        ({**base, "image": "media/img/missing.png", "conversations": [{"from": "human", "value": "<image>"}]}, "not"),
        ({"id": "x2", "conversations": []}, "x2: no conversations"),
    ]
    for raw, message in cases:
        with pytest.raises(DataError, match=message):
            parse_sample(raw, data_root)
    with pytest.raises(DataFormatError, match=r"no manifest\.json; the dataset is missing or incomplete"):
        StageDataset(tmp_path, {"image_qa": 1.0}, None, OlaConfig.from_name("tiny"))
