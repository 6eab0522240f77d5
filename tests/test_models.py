"""Model config, presets, the paper's parameter counts, meta-device building and forward shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from translution_dist.models import PRESETS, ModelConfig, build_model, count_parameters
from translution_dist.models.attention import SelfAttention
from translution_dist.ops import DisplacementBank

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

PAPER_COUNTS = {
    "vit_a56_self_attention": 4_688_296,
    "vit_a56_alpha": 5_334_760,
    "vit_a56_translution": 38_526_184,
    "gpt_tiny_self_attention": 21_995_904,
    "gpt_tiny_alpha": 23_734_656,
    "gpt_tiny_translution": 127_469_952,
    "mnist_vit_self_attention": 2_706_346,
    "mnist_vit_alpha": 4_590_634,
    "mnist_vit_translution": 116_164_138,
    # the convolution–attention mixers at the same size (not in the paper; docs/models.md)
    "mnist_vit_acmix": 2_698_216,
    "mnist_vit_shift_structure": 2_699_842,
    "mnist_vit_uniformer": 2_493_418,
    "mnist_vit_mixformer": 2_704_528,
}

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)


def load(name: str, **changes) -> ModelConfig:
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    return ModelConfig.model_validate({**raw, **changes})


def meta_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(cfg))


def test_every_model_config_file_is_covered():
    assert sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")) == sorted(PAPER_COUNTS)


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    assert meta_count(load(name)) == PAPER_COUNTS[name]


@pytest.mark.parametrize("name", [name for name in sorted(PAPER_COUNTS) if "self_attention" not in name])
def test_bank_chunks_do_not_change_the_count(name):
    assert meta_count(load(name, bank_chunks=4)) == PAPER_COUNTS[name]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("attention", ["translution", "alpha", "self_attention"])
@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_presets_build_on_meta(arch, attention, preset):
    cfg = ModelConfig(arch=arch, attention=attention, preset=preset, patch_size=32, context_length=64)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    d = PRESETS[preset]
    assert len(model.encoder.blocks) == d.depth and model.encoder.norm.normalized_shape == (d.dim,)


def test_presets_follow_the_paper():
    assert [tuple(PRESETS[name]) for name in ("tiny", "mini", "small", "base", "large")] == [
        (192, 6, 3, 64, 768), (192, 12, 3, 64, 768), (384, 12, 6, 64, 1536),
        (768, 12, 12, 64, 3072), (1024, 24, 16, 64, 4096)]


def test_overrides_replace_single_preset_fields():
    cfg = ModelConfig(arch="gpt", attention="translution", preset="small", heads=4, dim_head=32)
    assert tuple(cfg.dims) == (384, 12, 4, 32, 1536)  # C' = 128 differs from dim: allowed
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("changes,field", [
    (dict(arch="vit", image_size=100, patch_size=16), "image_size (100) is not divisible by patch_size (16)"),
    (dict(arch="gpt", context_length=8, bank_chunks=9), "bank_chunks (9) exceeds the K=8 displacements"),
    (dict(arch="vit", image_size=32, patch_size=16, bank_chunks=13), "exceeds the K=12 displacements"),
    (dict(arch="gpt", relative="qx"), "relative must be a non-empty subset of 'qkv'"),
    (dict(arch="gpt", relative=""), "relative must be a non-empty subset of 'qkv'"),
    (dict(arch="gpt", attention="self_attention", relative="kv"),
     "relative='kv' applies to attention=translution or alpha"),
    (dict(arch="gpt", position="rope"), "it needs relative='v'"),
    (dict(arch="gpt", position="relative_bias"), "relative_bias applies to attention=self_attention only"),
    (dict(arch="gpt", relative_blocks=3, depth=2), "relative_blocks (3) exceeds depth (2)"),
    (dict(arch="gpt", attention="self_attention", relative_blocks=1), "relative_blocks applies to"),
    (dict(arch="gpt", pool="mean"), "pool applies to arch=vit only"),
    (dict(arch="vit", image_size=[32, 30], patch_size=[8, 4]), "is not divisible by patch_size"),
    (dict(arch="vit", image_size=[32, 0]), "sizes must be positive"),
    (dict(arch="gpt", attention="self_attention", position="rope", dim_head=6), "rope needs dim_head divisible by 4"),
    (dict(arch="gpt", depths=3), "depths"),
])
def test_invalid_configs_name_the_field_and_the_fix(changes, field):
    with pytest.raises(ValidationError, match=field.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.model_validate({"attention": "translution", **changes})


def test_relative_is_canonicalised_and_positions_default_by_attention():
    assert ModelConfig(arch="gpt", attention="translution", relative="vk").relative == "kv"
    assert ModelConfig(arch="gpt", attention="self_attention").resolved_position == "learned"
    assert ModelConfig(arch="gpt", attention="alpha").resolved_position == "none"


def _tiny(arch: str, attention: str, **extra) -> ModelConfig:
    shape = dict(image_size=12, patch_size=4, channels=2, num_classes=7) if arch == "vit" else dict(
        context_length=6, vocab_size=13)
    return ModelConfig(arch=arch, attention=attention, **{**TINY, **shape, **extra})


def _inputs(cfg: ModelConfig, batch: int = 2, n: int | None = None) -> torch.Tensor:
    if cfg.arch == "vit":
        return torch.randn(batch, cfg.channels, *cfg.image_hw)
    return torch.randint(0, cfg.vocab_size, (batch, n or cfg.context_length))


ATTENTIONS = [
    pytest.param("translution", {}, id="translution"),
    pytest.param("translution", {"relative": "kv"}, id="translution-kv"),
    pytest.param("alpha", {}, id="alpha"),
    pytest.param("self_attention", {}, id="sa-learned"),
    pytest.param("self_attention", {"position": "rope"}, id="sa-rope"),
    pytest.param("self_attention", {"position": "relative_bias"}, id="sa-relative-bias"),
    pytest.param("alpha", {"relative": "k", "position": "rope"}, id="alpha-k-rope"),
    pytest.param("translution", {"relative": "v", "position": "learned+rope", "rope_convention": "official"},
                 id="translution-v-rope-official"),
    pytest.param("alpha", {"relative": "qv", "relative_blocks": 1, "dropout": 0.1}, id="alpha-qv-hybrid"),
]


@pytest.mark.parametrize("attention,extra", ATTENTIONS)
def test_vit_forward_shape(attention, extra):
    cfg = _tiny("vit", attention, **extra)
    logits = build_model(cfg)(_inputs(cfg, batch=3))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("attention,extra", ATTENTIONS)
@pytest.mark.parametrize("n", [6, 4, 1])
def test_gpt_forward_shape_and_shorter_sequences(attention, extra, n):
    cfg = _tiny("gpt", attention, **extra)
    logits = build_model(cfg)(_inputs(cfg, n=n))
    assert logits.shape == (2, n, 13) and torch.isfinite(logits).all()


@pytest.mark.parametrize("attention,extra", [("translution", {}), ("alpha", {}), ("self_attention", {}),
                                             ("translution", {"relative_blocks": 1, "relative": "qk"}),
                                             ("alpha", {"relative_blocks": 0, "position": "rope"})])
def test_gpt_is_causal(attention, extra):
    """Hybrids too: their self-attention blocks are causal (the official ones are not)."""
    cfg = _tiny("gpt", attention, **extra)
    model = build_model(cfg)
    tokens = _inputs(cfg)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(changed)[:, :4], model(tokens)[:, :4])


def test_bad_inputs_are_refused_with_the_expected_shape():
    gpt = build_model(_tiny("gpt", "translution"))
    with pytest.raises(ValueError, match="exceeds context_length=6"):
        gpt(torch.zeros(1, 7, dtype=torch.long))
    vit = build_model(_tiny("vit", "translution"))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 2, 12, 12\]"):
        vit(torch.zeros(1, 3, 12, 12))


def test_hybrids_have_relative_attention_in_their_first_blocks_only():
    cfg = _tiny("vit", "alpha", depth=3, relative_blocks=2, relative="kv")
    kinds = [type(block.attn).__name__ for block in build_model(cfg).encoder.blocks]
    assert kinds == ["AlphaTranslutionAttention", "AlphaTranslutionAttention", "SelfAttention"]
    plain = build_model(cfg).encoder.blocks[2].attn
    assert plain.position == "none" and plain.rotary is None


def test_rectangular_images_and_patches_and_mean_pooling():
    cfg = _tiny("vit", "translution", image_size=[8, 12], patch_size=[4, 2], pool="mean")
    assert cfg.grid_hw == (2, 6) and cfg.layout().num_displacements == 3 * 11 + 3
    model = build_model(cfg)
    assert model(_inputs(cfg, batch=3)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 2, 8, 12\]"):
        model(torch.zeros(1, 2, 12, 8))
    images = _inputs(cfg)
    tokens = model.encoder(torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], dim=1))
    torch.testing.assert_close(model(images), model.head(tokens.mean(dim=1)))


def test_one_head_as_wide_as_the_model_has_no_output_projection():
    """As the official to_out: nn.Identity when heads == 1 and dim_head == dim."""
    wide = build_model(_tiny("gpt", "alpha", heads=1, dim_head=16, relative="v"))
    assert all(isinstance(block.attn.out_proj, torch.nn.Identity) for block in wide.encoder.blocks)
    narrow = build_model(_tiny("gpt", "alpha", heads=2, dim_head=8, relative="v"))
    assert isinstance(narrow.encoder.blocks[0].attn.out_proj, torch.nn.Linear)


def test_gpt_keeps_both_final_norms_and_an_untied_head():
    model = build_model(_tiny("gpt", "translution"))
    names = dict(model.named_parameters())
    assert "encoder.norm.weight" in names and "final_norm.weight" in names
    assert "head.bias" not in names and model.head.weight is not model.token_embedding.weight


@pytest.mark.parametrize("arch", ["vit", "gpt"])
@pytest.mark.parametrize("attention,extra", ATTENTIONS)
def test_meta_build_materialises_with_init_weights(arch, attention, extra):
    chunks = {} if attention == "self_attention" else {"bank_chunks": 2}
    cfg = _tiny(arch, attention, **chunks, **extra)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    for (name, buf), (_, ref) in zip(model.named_buffers(), build_model(cfg).named_buffers(), strict=True):
        torch.testing.assert_close(buf, ref, msg=name)  # computed buffers (rotary frequencies) are redone
    assert torch.isfinite(model(_inputs(cfg))).all()


def test_init_weights_follows_the_official_initialisation():
    cfg = _tiny("vit", "translution")
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.init_weights()
    bank = next(m for m in model.modules() if isinstance(m, DisplacementBank))
    assert bank.weight.abs().max() <= (bank.in_features * bank.out_features) ** -0.5
    assert torch.equal(model.encoder.norm.weight, torch.ones(16))
    assert torch.equal(model.encoder.norm.bias, torch.zeros(16))
    assert (model.cls_token != 7.0).all()
    relative_bias = build_model(_tiny("vit", "self_attention", position="relative_bias"))
    layer = next(m for m in relative_bias.modules() if isinstance(m, SelfAttention))
    with torch.no_grad():
        layer.bias_table.fill_(7.0)
    relative_bias.init_weights()
    assert layer.bias_table.abs().max() < 0.1
