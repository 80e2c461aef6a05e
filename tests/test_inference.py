"""The local pipeline end to end on generated media: images, video with its audio, speech; limits."""

import dataclasses
import math

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from ola_model import InputError, LimitError, MediaError, OlaPipeline, OlaRequest, SamplingParams
from ola_model.tokens import audio_num_tokens, image_num_tokens, video_num_tokens


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (640, 480), (200, 30, 30)).save(d / "red.png")
    Image.new("RGB", (336, 336), (30, 30, 200)).save(d / "blue.jpg")
    t = np.arange(16000 * 3) / 16000
    sf.write(d / "tone.wav", 0.3 * np.sin(2 * math.pi * 440 * t), 16000)
    sf.write(d / "long.wav", np.zeros(16000 * 60 * 13, dtype=np.float32), 16000)  # 13 min: 26 chunks
    (d / "bad.png").write_bytes(b"not an image at all")
    with av.open(str(d / "clip.mp4"), "w") as out:
        v = out.add_stream("h264", rate=10)
        v.width, v.height, v.pix_fmt = 320, 240, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        for i in range(20):
            arr = np.zeros((240, 320, 3), np.uint8)
            arr[:, i * 10 : i * 10 + 40] = 255
            for pkt in v.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in v.encode():
            out.mux(pkt)
        samples = (0.3 * np.sin(2 * math.pi * 300 * np.arange(32000) / 16000)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for pkt in a.encode(frame):
            out.mux(pkt)
        for pkt in a.encode():
            out.mux(pkt)
    return d


def test_image_prompt_occupies_the_documented_positions(tiny_pipeline, media):
    prompt = tiny_pipeline.prepare(OlaRequest("What colour?", images=[media / "red.png", media / "blue.jpg"]))
    assert prompt.num_tokens["image"] == image_num_tokens(640, 480) + image_num_tokens(336, 336) == 458 + 291
    assert prompt.embeds.shape[0] == sum(prompt.num_tokens.values())


def test_video_with_audio_uses_every_frame_and_the_track(tiny_pipeline, media):
    prompt = tiny_pipeline.prepare(OlaRequest("What moves?", video=media / "clip.mp4", max_video_frames=8))
    assert prompt.num_tokens["video"] == video_num_tokens(320, 240, 8)  # all 8 frames reach the LLM
    assert prompt.num_tokens["audio"] == audio_num_tokens(32000) == 153
    silent = tiny_pipeline.prepare(
        OlaRequest("What moves?", video=media / "clip.mp4", max_video_frames=8, use_video_audio=False)
    )
    assert silent.num_tokens["audio"] == 0
    assert silent.embeds.shape[0] == prompt.embeds.shape[0] - 153  # the block replaced its <speech> placeholder


def test_generation_answers_every_modality(tiny_pipeline, media):
    params = SamplingParams.greedy(max_new_tokens=6)
    requests = [
        OlaRequest("Describe.", images=[media / "red.png"]),
        OlaRequest("Please give the ASR results of the given speech.", audio=media / "tone.wav"),
        OlaRequest("What happens?", video=media / "clip.mp4", max_video_frames=4),
        OlaRequest("", images=[media / "blue.jpg"], audio=media / "tone.wav", spoken_question=True),
        OlaRequest("Just text."),
    ]
    batched = tiny_pipeline.generate(requests, params)
    alone = [tiny_pipeline.generate([r], params)[0] for r in requests]
    assert batched == alone
    streamed = "".join(tiny_pipeline.stream(requests[0], params))
    assert streamed.strip() == alone[0]


def test_media_and_limit_errors_are_clear(tiny_pipeline, media):
    with pytest.raises(MediaError, match="image"):
        tiny_pipeline.prepare(OlaRequest("x", images=[media / "bad.png"]))
    with pytest.raises(LimitError, match=r"audio chunks.*25"):
        tiny_pipeline.prepare(OlaRequest("x", audio=media / "long.wav"))
    with pytest.raises(LimitError, match="64"):
        tiny_pipeline.prepare(OlaRequest("x", video=media / "clip.mp4", max_video_frames=65))
    with pytest.raises(InputError, match="images or one video"):
        tiny_pipeline.prepare(OlaRequest("x", images=[media / "red.png"], video=media / "clip.mp4"))
    with pytest.raises(InputError, match="spoken"):
        tiny_pipeline.prepare(OlaRequest("", images=[media / "red.png"], spoken_question=True))


def test_context_overflow_names_each_modality(tiny_model, tiny_tok, media):
    small = dataclasses.replace(
        tiny_model.config, limits=dataclasses.replace(tiny_model.config.limits, max_context=600)
    )
    model = type(tiny_model).__new__(type(tiny_model))
    model.__dict__ = dict(tiny_model.__dict__)
    model.config = small
    pipe = OlaPipeline(model, tiny_tok)
    with pytest.raises(LimitError, match=r"image 458.*text"):
        pipe.prepare(OlaRequest("x", images=[media / "red.png"]), reserve=200)
    assert pipe.prepare(OlaRequest("x", images=[media / "red.png"])).embeds.shape[0] < 600


def test_from_preset_is_deterministic():
    a = OlaPipeline.from_preset("tiny", seed=1)
    b = OlaPipeline.from_preset("tiny", seed=1)
    assert torch.equal(a.model.llm.lm_head.weight, b.model.llm.lm_head.weight)
    with pytest.raises(InputError, match="checkpoint"):
        OlaPipeline.from_preset("ola-7b")
