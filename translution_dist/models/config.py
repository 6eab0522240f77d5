"""The ``model:`` section of a run config: which of the paper's models to build.

Widths come from a named preset (the paper's tiny … large) unless overridden field by
field; unset fields stay ``None`` in the config so that a dumped config reloads the same
and a ``model.preset=…`` override still takes effect. Read resolved values through
:attr:`ModelConfig.dims` and :attr:`ModelConfig.resolved_position`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from translution_dist.ops import CausalLayout, ImageGridLayout, RelativeLayout

Arch = Literal["vit", "gpt"]
AttentionKind = Literal["translution", "alpha", "self_attention", "acmix", "shift_structure",
                        "uniformer", "mixformer"]
BANK_ATTENTIONS = ("translution", "alpha")
"""Attentions with displacement banks (what ``relative``, ``relative_blocks`` and ``dispp`` act on)."""
MIXERS: dict[str, tuple[str, ...]] = {"acmix": ("vit",), "shift_structure": ("vit", "gpt"), "uniformer": ("vit",),
                                      "mixformer": ("vit",)}
"""The convolution–attention family of ``translution_dist.models.mixers`` and the archs each is defined for."""
TP_REFUSALS = {
    "acmix": "its convolution path's fully connected layer mixes the features of all heads",
    "shift_structure": "its shift-matrix table [K, heads] is indexed for all heads inside the layer",
    "uniformer": "its local blocks' depthwise convolutions have no head-parallel rule",
    "mixformer": "its channel interaction maps all convolution channels to all heads' values",
}
"""Mixers that tensor parallelism cannot split by heads, and why (one place; parallelism reads it)."""
Position = Literal["learned", "none", "rope", "learned+rope", "relative_bias"]
Size2D = int | tuple[int, int]


class Dims(NamedTuple):
    """Resolved widths of a model; the attention width is ``C' = heads·dim_head``."""

    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_dim: int


PRESETS: dict[str, Dims] = {
    "tiny": Dims(dim=192, depth=6, heads=3, dim_head=64, mlp_dim=768),
    "mini": Dims(dim=192, depth=12, heads=3, dim_head=64, mlp_dim=768),
    "small": Dims(dim=384, depth=12, heads=6, dim_head=64, mlp_dim=1536),
    "base": Dims(dim=768, depth=12, heads=12, dim_head=64, mlp_dim=3072),
    "large": Dims(dim=1024, depth=24, heads=16, dim_head=64, mlp_dim=4096),
}


class ModelConfig(BaseModel):
    """One ViT or GPT of the paper, with Translution, α-Translution or self-attention."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    arch: Arch = Field(description="vit: image classifier (class token, patch grid); gpt: causal language model.")
    attention: AttentionKind = Field(
        description="translution: full Translution; alpha: α-Translution (attention + rank-r Translution); "
                    "self_attention: the baseline; acmix: ACmix (convolution and local attention on shared "
                    "projections, arch=vit); shift_structure: attention plus learned shift matrices (Andreoli); uniformer: UniFormer's relation "
                    "aggregator (local in shallow blocks, global in deep ones, arch=vit); mixformer: "
                    "window attention ∥ depthwise convolution with bidirectional interactions (arch=vit).")
    preset: Literal["tiny", "mini", "small", "base", "large"] = Field(
        "tiny", description="Widths of the paper's sizes: tiny 192/6 layers/3 heads/MLP 768, mini 192/12/3/768, "
                            "small 384/12/6/1536, base 768/12/12/3072, large 1024/24/16/4096; dim_head 64.")
    dim: int | None = Field(None, ge=1, description="Token width C; default: from the preset.")
    depth: int | None = Field(None, ge=1, description="Number of blocks; default: from the preset.")
    heads: int | None = Field(None, ge=1, description="Attention heads; default: from the preset.")
    dim_head: int | None = Field(None, ge=1, description="Width per head; C' = heads·dim_head need not equal dim.")
    mlp_dim: int | None = Field(None, ge=1, description="Hidden width of the feed-forward; default: from the preset.")
    relative: str = Field(
        "qkv", description="Which of q, k, v are displacement banks, a non-empty subset of 'qkv' such as 'qkv', "
                           "'kv' or 'v'. attention=translution: the others are plain linear maps. "
                           "attention=alpha: the sides of the rank-r Translution term (official LoR_QKV, LoR_KV, "
                           "...); a score term needs q or k, a value term v.")
    alpha_rank: int = Field(8, ge=1, description="attention=alpha: rank r per head of the Translution term.")
    position: Position | None = Field(
        None, description="Position information besides the relative banks. learned: an absolute embedding "
                          "added at the input (default for self_attention); none (default for translution and "
                          "alpha); rope: rotary embedding of the plain queries and keys (self_attention, alpha, "
                          "and translution with relative='v'); learned+rope: both; relative_bias: "
                          "self_attention only.")
    rope_convention: Literal["project", "official"] = Field(
        "project", description="Rotary layout. project (default): channels 2i and 2i+1 form a pair, patches at "
                               "(row+1, col+1); official: channel i pairs with i+d/2, patches at (row, col), as the "
                               "official rope_* files (needed to import their weights). The class token is never "
                               "rotated.")
    relative_blocks: int | None = Field(
        None, ge=0, description="Hybrid (official tln_num): only the first N blocks use the relative attention, "
                                "the others self-attention without position information (causal in a GPT). "
                                "Default: every block.")
    mixer_kernel: int = Field(
        3, ge=1, description="Mixers' window side k, odd. acmix: the k×k attention window and convolution kernel; "
                             "uniformer: local MHRA's k×k depthwise affinity (the paper's 5); mixformer: the side of "
                             "its non-overlapping attention windows (the paper's 7).")
    local_blocks: int | None = Field(
        None, ge=0, description="attention=uniformer: the first N blocks use local MHRA, the others global MHRA "
                                "(self-attention). Default: half the depth (rounded down).")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="arch=vit: classify from the class token (cls) or the mean of all tokens (mean).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities, attention output and both "
                                         "feed-forward layers (official dropout).")
    emb_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the embedded input tokens.")
    bank_chunks: int = Field(
        1, ge=1, description="Displacement chunks each bank is stored in (the ZeRO-3 gather unit); at most K.")
    image_size: Size2D = Field(224, description="arch=vit: image side in pixels, or [height, width].")
    patch_size: Size2D = Field(16, description="arch=vit: patch side, or [height, width]; must divide image_size.")
    channels: int = Field(3, ge=1, description="arch=vit: image channels (3 for RGB, 1 for grayscale).")
    num_classes: int = Field(1000, ge=1, description="arch=vit: classes of the classification head.")
    context_length: int = Field(160, ge=1, description="arch=gpt: longest sequence, the K of a causal bank.")
    vocab_size: int = Field(50257, ge=1, description="arch=gpt: token vocabulary (50,257 for the GPT-2 tokenizer).")

    @field_validator("image_size", "patch_size")
    @classmethod
    def _positive_sizes(cls, value: Size2D) -> Size2D:
        if min(_pair(value)) < 1:
            raise ValueError(f"sizes must be positive, got {value}")
        return value

    @field_validator("relative")
    @classmethod
    def _relative_is_a_subset(cls, value: str) -> str:
        canonical = "".join(side for side in "qkv" if side in value)
        if not value or len(canonical) != len(value):
            raise ValueError(f"relative must be a non-empty subset of 'qkv' such as 'qkv', 'kv' or 'v', got {value!r}")
        return canonical

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.arch == "vit" and any(i % p for i, p in zip(self.image_hw, self.patch_hw)):
            raise ValueError(
                f"image_size ({self.image_size}) is not divisible by patch_size ({self.patch_size}); "
                "choose a patch size that divides the image side")
        if self.attention not in BANK_ATTENTIONS and self.relative != "qkv":
            raise ValueError(f"relative={self.relative!r} applies to attention=translution or alpha only; remove it")
        if self.attention in MIXERS:
            self._check_mixer()
        if self.local_blocks is not None and self.attention != "uniformer":
            raise ValueError("local_blocks applies to attention=uniformer only; remove it")
        position = self.resolved_position
        if self.attention != "self_attention" and position == "relative_bias":
            raise ValueError("position=relative_bias applies to attention=self_attention only; use none, learned "
                             "or rope")
        if self.rotary and self.attention == "translution" and self.relative != "v":
            raise ValueError(
                f"position={position} with attention=translution rotates plain queries and keys: it needs "
                f"relative='v' (the official RoPE-Translution), got relative={self.relative!r}")
        if self.rotary and self.dims.dim_head % 4:
            raise ValueError(f"position={position} needs dim_head divisible by 4, got {self.dims.dim_head}")
        if self.relative_blocks is not None:
            if self.attention not in BANK_ATTENTIONS:
                raise ValueError("relative_blocks applies to attention=translution or alpha; remove it")
            if self.relative_blocks > self.dims.depth:
                raise ValueError(f"relative_blocks ({self.relative_blocks}) exceeds depth ({self.dims.depth})")
        if self.arch == "gpt" and self.pool != "cls":
            raise ValueError("pool applies to arch=vit only; remove it")
        k = self.layout().num_displacements
        if self.attention in BANK_ATTENTIONS and self.bank_chunks > k:
            raise ValueError(
                f"bank_chunks ({self.bank_chunks}) exceeds the K={k} displacements of this model; use at most {k}")
        return self

    def _check_mixer(self) -> None:
        if self.arch not in MIXERS[self.attention]:
            raise ValueError(f"attention={self.attention} is defined for arch={' or '.join(MIXERS[self.attention])} "
                             f"only, got arch={self.arch}")
        if self.resolved_position not in ("none", "learned"):
            raise ValueError(f"attention={self.attention} takes position=none or learned, got {self.position}")
        if self.local_blocks is not None and self.local_blocks > self.dims.depth:
            raise ValueError(f"local_blocks ({self.local_blocks}) exceeds depth ({self.dims.depth})")
        if self.attention == "mixformer" and self.dims.dim_head % 2:
            raise ValueError(f"attention=mixformer halves dim_head for its attention branch: it must be even, "
                             f"got {self.dims.dim_head}")
        if self.mixer_kernel % 2 == 0:
            raise ValueError(f"mixer_kernel must be odd (a window centred on its token), got {self.mixer_kernel}")

    @property
    def dims(self) -> Dims:
        """The preset's widths with this config's overrides applied."""
        preset = PRESETS[self.preset]
        overrides = {name: getattr(self, name) for name in Dims._fields if getattr(self, name) is not None}
        return preset._replace(**overrides)

    @property
    def resolved_position(self) -> Position:
        """``position`` with its default filled in: learned for self-attention, none otherwise."""
        if self.position is not None:
            return self.position
        return "learned" if self.attention == "self_attention" else "none"

    @property
    def learned_position(self) -> bool:
        """Whether the model adds a learned absolute position embedding at the input."""
        return self.resolved_position in ("learned", "learned+rope")

    @property
    def rotary(self) -> bool:
        """Whether the attention layers rotate queries and keys (RoPE)."""
        return self.resolved_position in ("rope", "learned+rope")

    @property
    def num_relative_blocks(self) -> int:
        """Blocks with the relative attention (``depth`` but for hybrids and self-attention)."""
        if self.attention not in BANK_ATTENTIONS:
            return 0
        return self.dims.depth if self.relative_blocks is None else self.relative_blocks

    @property
    def num_local_blocks(self) -> int:
        """attention=uniformer: blocks with local MHRA (the first ones)."""
        return self.dims.depth // 2 if self.local_blocks is None else self.local_blocks

    @property
    def image_hw(self) -> tuple[int, int]:
        """arch=vit: image (height, width) in pixels."""
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        """arch=vit: patch (height, width) in pixels."""
        return _pair(self.patch_size)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """arch=vit: the patch grid (rows, columns)."""
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        return ih // ph, iw // pw

    @property
    def num_patches(self) -> int:
        """arch=vit: patches per image."""
        rows, cols = self.grid_hw
        return rows * cols

    def layout(self) -> RelativeLayout:
        """The token geometry: a class token and a patch grid, or a causal window."""
        if self.arch == "vit":
            return ImageGridLayout(*self.grid_hw)
        return CausalLayout(self.context_length)


def _pair(value: Size2D) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
