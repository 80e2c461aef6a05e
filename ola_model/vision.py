"""OryxViT: the native-resolution vision encoder of Ola.

A SigLIP-so400m-shaped ViT (width 1152, 27 pre-norm blocks, exact GELU) with 16-pixel patches, no class token and
no final norm. Its learned 128x128 position table is resized bilinearly to each image's patch grid, so images of any
size (multiples of 16) are encoded at their native resolution. Images of different sizes go through one call as a
padded batch whose attention masks out the padding: the result equals encoding each image alone.

State-dict names follow the timm-style checkpoint (``patch_embed.proj``, ``pos_embed``, ``blocks.L.attn.qkv`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ola_model.errors import InputError

# How many distinct token counts run as unpadded groups; beyond it, one padded batch. On CPU grouping was faster at
# every count measured (8 images of 3 sizes, 6 lengths: 37.9 ms grouped, 53.0 ms padded, 40.2 ms one image at a
# time); on accelerators it is untested, so they keep the padded batch beyond an image's two views.
MAX_UNPADDED_GROUPS: dict[str, int] = {"cpu": 1 << 30}
DEFAULT_MAX_UNPADDED_GROUPS = 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches projected to ``dim`` channels by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> tokens (B, H/p * W/p, dim), row-major over the patch grid."""
        return self.proj(image).flatten(2).transpose(1, 2)  # (B, h*w, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, C); key_mask (B, 1, 1, L) bool, True where a key is a real token (None: all real)."""
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
        q, k, v = qkv.unbind(0)
        # scale defaults to head_dim ** -0.5, as in the checkpoint's attention
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, L, D)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, not the tanh approximation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class OryxViT(nn.Module):
    """The vision tower. Takes normalised images ([-1, 1], CHW) and returns per-patch features."""

    def __init__(
        self,
        dim: int = 1152,
        depth: int = 27,
        num_heads: int = 16,
        mlp_dim: int = 4304,
        patch_size: int = 16,
        in_channels: int = 3,
        pos_grid: int = 128,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.pos_embed = nn.Parameter(torch.empty(1, pos_grid * pos_grid, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_dim, eps) for _ in range(depth)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed.device.type == "meta":
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The position table resized to an (h, w) patch grid: (h*w, C).

        Bilinear with ``align_corners=False``, computed in float32; the exact table when (h, w) is the table's grid.
        """
        G, C = self.pos_grid, self.dim
        table = self.pos_embed
        if (h, w) == (G, G):
            return table[0]
        grid = table.float().reshape(1, G, G, C).permute(0, 3, 1, 2)  # (1, C, G, G)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # (1, C, h, w)
        return grid.permute(0, 2, 3, 1).reshape(h * w, C).to(table.dtype)

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Encode images of any sizes.

        Args:
            images: a list of (3, H, W) tensors (sizes may differ) or one (B, 3, H, W) tensor. Sides that are not
                multiples of the patch size are zero-padded right/bottom.
        Returns:
            one (h*w, C) feature tensor per image, h = ceil(H/16), w = ceil(W/16), row-major over the grid.
        """
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise InputError(f"images tensor must be (B, 3, H, W), got shape {tuple(images.shape)}")
            images = list(images.unbind(0))
        if not images:
            return []
        p = self.patch_size
        dtype = self.patch_embed.proj.weight.dtype
        tokens: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != self.patch_embed.proj.in_channels:
                raise InputError(f"each image must be (3, H, W), got shape {tuple(img.shape)}")
            H, W = img.shape[-2:]
            pad_h, pad_w = (-H) % p, (-W) % p
            if pad_h or pad_w:
                img = F.pad(img, (0, pad_w, 0, pad_h))
            h, w = (H + pad_h) // p, (W + pad_w) // p
            x = self.patch_embed(img.unsqueeze(0).to(dtype))[0]  # (h*w, C)
            tokens.append(x + self.position_embedding(h, w))
            grids.append((h, w))

        lengths = [t.shape[0] for t in tokens]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        if len(groups) <= MAX_UNPADDED_GROUPS.get(tokens[0].device.type, DEFAULT_MAX_UNPADDED_GROUPS):
            # Images of one length go together without padding, so attention needs no mask and runs its fused
            # kernel: an image's low- and high-res views are two such groups (30% faster on CPU than padded).
            out: list[torch.Tensor] = [tokens[0]] * len(tokens)
            for idx in groups.values():
                x = torch.stack([tokens[i] for i in idx])  # (b, L, C)
                for block in self.blocks:
                    x = block(x, None)
                for j, i in enumerate(idx):
                    out[i] = x[j]
            return out
        # Many lengths: pad to one batch; padded keys are masked out so every image only attends to itself.
        L = max(lengths)
        x = torch.stack([F.pad(t, (0, 0, 0, L - t.shape[0])) for t in tokens])  # (B, L, C)
        valid = torch.arange(L, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        key_mask = valid[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, key_mask)
        return [x[i, :n] for i, n in enumerate(lengths)]
