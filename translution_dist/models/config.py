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
AttentionKind = Literal["translution", "alpha", "self_attention"]
Position = Literal["learned", "none", "rope", "relative_bias"]


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
                    "self_attention: the baseline.")
    preset: Literal["tiny", "mini", "small", "base", "large"] = Field(
        "tiny", description="Widths of the paper's sizes: tiny 192/6 layers/3 heads/MLP 768, mini 192/12/3/768, "
                            "small 384/12/6/1536, base 768/12/12/3072, large 1024/24/16/4096; dim_head 64.")
    dim: int | None = Field(None, ge=1, description="Token width C; default: from the preset.")
    depth: int | None = Field(None, ge=1, description="Number of blocks; default: from the preset.")
    heads: int | None = Field(None, ge=1, description="Attention heads; default: from the preset.")
    dim_head: int | None = Field(None, ge=1, description="Width per head; C' = heads·dim_head need not equal dim.")
    mlp_dim: int | None = Field(None, ge=1, description="Hidden width of the feed-forward; default: from the preset.")
    relative: str = Field(
        "qkv", description="attention=translution: which of q, k, v are displacement banks (the others are "
                           "plain linear maps), a non-empty subset of 'qkv' such as 'qkv', 'kv' or 'v'.")
    alpha_rank: int = Field(8, ge=1, description="attention=alpha: rank r per head of the Translution term.")
    position: Position | None = Field(
        None, description="Position information besides the relative banks. learned: an absolute embedding "
                          "added at the input (default for self_attention); none (default for translution and "
                          "alpha); rope and relative_bias: self_attention only.")
    bank_chunks: int = Field(
        1, ge=1, description="Displacement chunks each bank is stored in (the ZeRO-3 gather unit); at most K.")
    image_size: int = Field(224, ge=1, description="arch=vit: square image side in pixels.")
    patch_size: int = Field(16, ge=1, description="arch=vit: square patch side; must divide image_size.")
    channels: int = Field(3, ge=1, description="arch=vit: image channels (3 for RGB, 1 for grayscale).")
    num_classes: int = Field(1000, ge=1, description="arch=vit: classes of the classification head.")
    context_length: int = Field(160, ge=1, description="arch=gpt: longest sequence, the K of a causal bank.")
    vocab_size: int = Field(50257, ge=1, description="arch=gpt: token vocabulary (50,257 for the GPT-2 tokenizer).")

    @field_validator("relative")
    @classmethod
    def _relative_is_a_subset(cls, value: str) -> str:
        canonical = "".join(side for side in "qkv" if side in value)
        if not value or len(canonical) != len(value):
            raise ValueError(f"relative must be a non-empty subset of 'qkv' such as 'qkv', 'kv' or 'v', got {value!r}")
        return canonical

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.arch == "vit" and self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) is not divisible by patch_size ({self.patch_size}); "
                "choose a patch size that divides the image side")
        if self.attention != "translution" and self.relative != "qkv":
            raise ValueError(f"relative={self.relative!r} applies to attention=translution only; remove it")
        position = self.resolved_position
        if self.attention != "self_attention" and position in ("rope", "relative_bias"):
            raise ValueError(
                f"position={position} applies to attention=self_attention only; use none or learned")
        if position == "rope" and self.dims.dim_head % 4:
            raise ValueError(f"position=rope needs dim_head divisible by 4, got {self.dims.dim_head}")
        k = self.layout().num_displacements
        if self.attention != "self_attention" and self.bank_chunks > k:
            raise ValueError(
                f"bank_chunks ({self.bank_chunks}) exceeds the K={k} displacements of this model; use at most {k}")
        return self

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
    def grid(self) -> int:
        """arch=vit: patches per image side."""
        return self.image_size // self.patch_size

    def layout(self) -> RelativeLayout:
        """The token geometry: a class token and a patch grid, or a causal window."""
        if self.arch == "vit":
            return ImageGridLayout(self.grid, self.grid)
        return CausalLayout(self.context_length)
