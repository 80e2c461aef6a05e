"""OryxViT, the local-global pooling and the vision block layouts, against direct formulas."""

import pytest
import torch
import torch.nn.functional as F

from ola_model import vision
from ola_model.projector import LocalGlobalPooler, VisionProjector
from ola_model.vision import OryxViT


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    return OryxViT(dim=32, depth=2, num_heads=2, mlp_dim=64, pos_grid=8, **kw).eval()


def test_pooling_matches_the_per_window_formula():
    torch.manual_seed(0)
    pool = LocalGlobalPooler(dim=6)
    x = torch.randn(2, 4, 6, 6)
    out = pool(x)
    assert out.shape == (2, 2, 3, 6)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                window = [x[b, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)]  # row-major x_1..x_4
                g = torch.stack(window).mean(0)
                scores = torch.stack([pool.predictor(torch.cat([xk, g])) for xk in window])  # (4, C)
                weights = torch.softmax(scores, dim=0)  # per channel over the 4 positions
                expected = sum(weights[k] * window[k] for k in range(4))
                torch.testing.assert_close(out[b, i, j], expected, rtol=1e-5, atol=1e-6)


def test_pooling_of_a_constant_window_returns_the_constant():
    pool = LocalGlobalPooler(dim=4)
    x = torch.ones(1, 2, 2, 4) * torch.tensor([1.0, -2.0, 3.0, 0.5])
    torch.testing.assert_close(pool(x)[0, 0, 0], torch.tensor([1.0, -2.0, 3.0, 0.5]))


def test_position_table_is_resized_bilinearly_without_corner_alignment():
    vit = _vit()
    table = vit.pos_embed.detach().reshape(8, 8, 32)
    # the exact table at the native grid
    torch.testing.assert_close(vit.position_embedding(8, 8), table.reshape(64, 32))
    # other grids: torch bilinear with align_corners=False on the (C, G, G) map
    grid = table.permute(2, 0, 1)[None]
    for h, w in [(4, 6), (16, 8), (3, 5)]:
        expected = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(vit.position_embedding(h, w), expected.permute(1, 2, 0).reshape(h * w, 32))
    # halving the grid with align_corners=False averages 2x2 blocks
    half = vit.position_embedding(4, 4).reshape(4, 4, 32)
    torch.testing.assert_close(half[1, 2], table[2:4, 4:6].mean((0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "sizes",
    [
        [(64, 96), (32, 32), (128, 48), (64, 96)],  # 24, 4, 24, 24 tokens: two groups, unpadded
        [(64, 96), (32, 32), (48, 48), (64, 96)],  # 24, 4, 9, 24 tokens: three lengths (padded beyond two off CPU)
    ],
    ids=["two-lengths", "three-lengths"],
)
@pytest.mark.parametrize("accelerator_limit", [False, True], ids=["cpu-groups", "accelerator-limit"])
def test_varlen_batch_equals_encoding_each_image_alone(sizes, accelerator_limit, monkeypatch):
    if accelerator_limit:  # what an accelerator does: a padded batch beyond two lengths
        monkeypatch.setattr(vision, "MAX_UNPADDED_GROUPS", {})
    vit = _vit()
    torch.manual_seed(1)
    images = [torch.randn(3, h, w) for h, w in sizes]
    assert len({(h // 16) * (w // 16) for h, w in sizes}) == (2 if sizes[2] == (128, 48) else 3)
    with torch.no_grad():
        batched = vit(images)
        alone = [vit([img])[0] for img in images]
    for b, a, img in zip(batched, alone, images, strict=True):
        assert b.shape == (img.shape[1] // 16 * img.shape[2] // 16, 32)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1][:1].expand_as(batched[0]))


def test_vit_pads_sides_to_the_patch_size_and_has_no_final_norm():
    vit = _vit()
    img = torch.randn(3, 40, 20)  # 40x20 -> padded to 48x32 -> 3x2 grid
    with torch.no_grad():
        (out,) = vit([img])
        (padded,) = vit([F.pad(img, (0, 12, 0, 8))])
    assert out.shape == (6, 32)
    torch.testing.assert_close(out, padded)
    assert not hasattr(vit, "norm") and not hasattr(vit, "cls_token")
    assert isinstance(vit.blocks[0].mlp.act, torch.nn.GELU) and vit.blocks[0].mlp.act.approximate == "none"


def test_image_block_layout_and_rows_with_newlines():
    torch.manual_seed(0)
    proj = VisionProjector(in_dim=8, out_dim=6)
    low = proj(torch.randn(1, 4 * 6, 8), 4, 6)[0]  # (2 rows x (3 + 1), C)
    high = proj(torch.randn(1, 8 * 4, 8), 8, 4)[0]  # (4 x (2 + 1), C)
    assert low.shape == (8, 6) and high.shape == (12, 6)
    for row in range(2):
        torch.testing.assert_close(low[row * 4 + 3], proj.image_newline.detach())
    block = proj.image_block(low, high)
    assert block.shape == (3 + 8 + 12, 6)
    torch.testing.assert_close(block[0], proj.image_begin.detach())
    torch.testing.assert_close(block[9], proj.image_sep.detach())
    torch.testing.assert_close(block[-1], proj.image_end.detach())
    torch.testing.assert_close(block[1:9], low)


def test_video_block_has_a_separator_after_every_frame():
    torch.manual_seed(0)
    proj = VisionProjector(in_dim=8, out_dim=6)
    frames = proj(torch.randn(3, 4 * 4, 8), 4, 4)  # (3, 2 * 3, C)
    block = proj.video_block(frames)
    per = frames.shape[1] + 1
    assert block.shape == (2 + 3 * per, 6)
    for t in range(3):
        torch.testing.assert_close(block[1 + t * per : 1 + t * per + frames.shape[1]], frames[t])
        torch.testing.assert_close(block[(t + 1) * per], proj.image_sep.detach())


def test_projector_order_is_proj1_pool_gelu_proj2():
    torch.manual_seed(0)
    proj = VisionProjector(in_dim=8, out_dim=6)
    feats = torch.randn(1, 16, 8)
    x = proj.proj1(feats).reshape(1, 4, 4, 6)
    expected = proj.proj2(F.gelu(proj.pooler(x)))  # (1, 2, 2, C)
    out = proj(feats, 4, 4).reshape(1, 2, 3, 6)
    torch.testing.assert_close(out[:, :, :2], expected)


def test_model_encoders_produce_blocks_of_the_documented_sizes(tiny_model):
    from ola_model.processing.audio import process_audio
    from ola_model.tokens import audio_num_tokens, view_num_tokens

    low, high = torch.randn(3, 64, 96), torch.randn(3, 128, 160)
    with torch.no_grad():
        (block,) = tiny_model.encode_images([(low, high)])
        video = tiny_model.encode_video(torch.randn(5, 3, 64, 128))
        audio = process_audio(torch.randn(16000 * 31) * 0.1)
        speech = tiny_model.encode_audio(audio.mel, audio.wav_chunks)
    assert block.shape[0] == 3 + view_num_tokens(96, 64) + view_num_tokens(160, 128)
    assert video.shape[0] == 2 + 5 * (view_num_tokens(128, 64) + 1)
    assert speech.shape[0] == audio_num_tokens(16000 * 31) == 2 + 2 * 151
    assert speech.shape[1] == video.shape[1] == block.shape[1] == tiny_model.config.llm.hidden_size
