"""The convolution–attention mixers (issue 14): each against a direct, slow implementation of its
paper's formula in float64 (forward and gradients), its parameter count, its FLOP census and
its config errors. Training under FSDP2 is in ``test_parallel_fsdp.py``."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from translution_dist.models import ModelConfig, build_model, count_parameters
from translution_dist.models.flops import flop_terms
from translution_dist.models.mixers import ACmix, MixFormerMixer, ShiftStructureAttention, UniFormerMixer
from translution_dist.ops import CausalLayout, ImageGridLayout, RelativeLayout

GRID = ImageGridLayout(3, 4)  # rectangular, so rows and columns cannot be confused
DIM, HEADS, DIM_HEAD = 6, 2, 3


def mnist(attention: str, **fields) -> ModelConfig:
    """The Dynamic MNIST ViT (configs/models/mnist_vit_*.yaml) with another mixer."""
    return ModelConfig(arch="vit", attention=attention, preset="tiny", image_size=84, patch_size=12, channels=1,
                       num_classes=10, **fields)


def assert_matches_reference(layer: torch.nn.Module, reference, tokens: int) -> None:
    """``layer`` and ``reference(layer, x)`` agree in float64: outputs, input and parameter gradients."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # move α, β, norms away from their initial values
    x = torch.randn(2, tokens, DIM, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, tokens, DIM, dtype=torch.float64)
    inputs = [x, *layer.parameters()]
    got = layer(x)
    want = reference(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, g, w in zip(["x", *(n for n, _ in layer.named_parameters())],
                          torch.autograd.grad((got * probe).sum(), inputs),
                          torch.autograd.grad((want * probe).sum(), inputs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


# -- ACmix ----------------------------------------------------------------------------------------

def acmix_reference(layer: ACmix, x: Tensor) -> Tensor:
    """Token by token, head by head, offset by offset: the paper's two paths and their mix."""
    layout, k, d, h = layer.layout, layer.kernel_size, layer.dim_head, layer.heads
    r = k // 2
    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), layer.norm.weight, layer.norm.bias)
    q, key, v = (t.unflatten(-1, (h, d)) for t in (xn @ layer.qkv_proj.weight.T).chunk(3, dim=-1))
    features = [q, key, v]  # feature j = (which of q, k, v) · h + head
    fc = layer.shift_fc.weight  # [k²·h, 3h]: map p of head t is row p·h + t

    def position(i: int) -> tuple[int, int] | None:
        return None if i == 0 else divmod(i - 1, layout.width)

    def token(row: int, col: int) -> int | None:
        inside = 0 <= row < layout.height and 0 <= col < layout.width
        return 1 + row * layout.width + col if inside else None

    def feature_map(p: int, head: int, i: int) -> Tensor:  # f_p of head t at token i: [B, d]
        return sum(fc[p * h + head, j] * features[j // h][:, i, j % h] for j in range(3 * h))

    n = x.shape[1]
    rows = []
    for i in range(n):
        heads = []
        for t in range(h):
            window = [j for j in range(n) if position(i) is None or position(j) is None
                      or max(abs(a - b) for a, b in zip(position(i), position(j))) <= r]
            scores = torch.stack([(q[:, i, t] * key[:, j, t]).sum(-1) / math.sqrt(d) for j in window], dim=-1)
            weights = scores.softmax(-1)
            attn = sum(weights[:, m, None] * v[:, j, t] for m, j in enumerate(window))
            if position(i) is None:
                conv = feature_map(k * k // 2, t, i)
            else:
                conv = torch.zeros_like(attn)
                for p in range(k * k):
                    src = token(position(i)[0] + p // k - r, position(i)[1] + p % k - r)
                    if src is not None:
                        conv = conv + feature_map(p, t, src)
            heads.append(layer.alpha * attn + layer.beta * conv)
        rows.append(torch.cat(heads, dim=-1))
    return layer.out_proj(torch.stack(rows, dim=1))


@pytest.mark.parametrize("kernel_size", [3, 5, 1])
def test_acmix_matches_the_papers_formula(kernel_size):
    layer = ACmix(GRID, DIM, HEADS, DIM_HEAD, kernel_size)
    assert_matches_reference(layer, acmix_reference, GRID.max_tokens)


def test_acmix_parameter_count():
    """norm 2C, shared q/k/v 3·C·C', fc 3h·k²h, α and β, out_proj C'·C + C; the whole DMNIST model too."""
    cfg = mnist("acmix")
    c, h, d, k = 192, 3, 64, 3
    layer = c * 2 + 3 * c * h * d + 3 * h * k * k * h + 2 + h * d * c + c
    model = build_model(cfg)
    assert count_parameters(model.encoder.blocks[0].attn) == layer
    sa = build_model(mnist("self_attention", position="none"))  # the same ViT with self-attention layers
    sa_layer = count_parameters(sa.encoder.blocks[0].attn)
    assert count_parameters(model) == count_parameters(sa) + 6 * (layer - sa_layer) == 2_698_216


# -- structure embedding by shift matrices ------------------------------------------------------------

def displacement(layout: RelativeLayout, i: int, j: int) -> int | None:
    """The table row of pair ``(i, j)`` from the layouts' documented formulas; None if masked."""
    if isinstance(layout, CausalLayout):
        return i - j if j <= i else None
    k = layout.num_displacements
    if i == 0 or j == 0:
        return {(True, True): k - 3, (True, False): k - 2, (False, True): k - 1}[(i == 0, j == 0)]
    (ra, ca), (rc, cc) = divmod(i - 1, layout.width), divmod(j - 1, layout.width)
    return (ra - rc + layout.height - 1) * (2 * layout.width - 1) + (ca - cc + layout.width - 1)


def shift_structure_reference(layer: ShiftStructureAttention, x: Tensor) -> Tensor:
    """``out_t = (softmax(Q_t K_tᵀ/√d) + Σ_δ λ_{δ,t} S_δ) V_t``, with every ``S_δ`` built as a 0/1 matrix."""
    n, d = x.shape[1], layer.dim_head
    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), layer.norm.weight, layer.norm.bias)
    q, k, v = (t.unflatten(-1, (-1, d)).transpose(1, 2) for t in (xn @ layer.qkv_proj.weight.T).chunk(3, dim=-1))
    allowed = torch.tensor([[displacement(layer.layout, i, j) is not None for j in range(n)] for i in range(n)])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    structure = torch.zeros(q.shape[1], n, n, dtype=x.dtype)
    for delta in range(layer.layout.num_displacements):
        shift = torch.tensor([[float(displacement(layer.layout, i, j) == delta) for j in range(n)]
                              for i in range(n)], dtype=x.dtype)
        structure = structure + layer.structure[delta][:, None, None] * shift
    out = (scores.softmax(-1) + structure) @ v
    return layer.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("layout,causal,tokens", [(GRID, False, GRID.max_tokens), (CausalLayout(7), True, 7),
                                                  (CausalLayout(7), True, 4)])
def test_shift_structure_matches_the_papers_formula(layout, causal, tokens):
    layer = ShiftStructureAttention(layout, DIM, HEADS, DIM_HEAD, causal)
    assert_matches_reference(layer, shift_structure_reference, tokens)


def test_shift_structure_parameter_count():
    """Self-attention's layer plus one scalar per displacement and head (K = 13·13 + 3 on the 7×7 grid)."""
    model = build_model(mnist("shift_structure"))
    sa = build_model(mnist("self_attention", position="none"))
    extra = (13 * 13 + 3) * 3
    assert count_parameters(model.encoder.blocks[0].attn) == count_parameters(sa.encoder.blocks[0].attn) + extra
    assert count_parameters(model) == count_parameters(sa) + 6 * extra == 2_699_842


# -- UniFormer ------------------------------------------------------------------------------------------

def depthwise_reference(conv: torch.nn.Conv2d, layout: ImageGridLayout, x: Tensor) -> Tensor:
    """``y_i = b + Σ_{j∈k×k(i)} a^{i−j} ⊙ x_j`` over the grid; the class token: centre tap and bias."""
    k = conv.kernel_size[0]
    r = k // 2
    rows = [x[:, 0] * conv.weight[:, 0, r, r] + conv.bias]
    for i in range(1, x.shape[1]):
        row, col = divmod(i - 1, layout.width)
        out = conv.bias.expand_as(x[:, i])
        for dr in range(-r, r + 1):
            for dc in range(-r, r + 1):
                if 0 <= row + dr < layout.height and 0 <= col + dc < layout.width:
                    out = out + conv.weight[:, 0, dr + r, dc + r] * x[:, 1 + (row + dr) * layout.width + col + dc]
        rows.append(out)
    return torch.stack(rows, dim=1)


def uniformer_reference(layer: UniFormerMixer, x: Tensor) -> Tensor:
    """``DPE(x) + MHRA(Norm(X))`` with ``X = x + DPE(x)``: local ``U(a ∗ V)`` or global softmax attention."""
    dpe = depthwise_reference(layer.position.conv, GRID, x)
    agg = layer.aggregator
    xn = torch.nn.functional.layer_norm(x + dpe, (x.shape[-1],), agg.norm.weight, agg.norm.bias)
    if isinstance(agg, torch.nn.Module) and hasattr(agg, "affinity"):
        mixed = depthwise_reference(agg.affinity.conv, GRID, xn @ agg.v_proj.weight.T + agg.v_proj.bias)
    else:
        q, k, v = (t.unflatten(-1, (-1, DIM_HEAD)).transpose(1, 2) for t in (xn @ agg.qkv_proj.weight.T).chunk(3, -1))
        mixed = ((q @ k.transpose(-1, -2) / math.sqrt(DIM_HEAD)).softmax(-1) @ v).transpose(1, 2).flatten(2)
    return dpe + agg.out_proj(mixed)


@pytest.mark.parametrize("local,kernel_size", [(True, 3), (True, 5), (False, 3)])
def test_uniformer_matches_the_papers_formula(local, kernel_size):
    layer = UniFormerMixer(GRID, DIM, HEADS, DIM_HEAD, local, kernel_size)
    assert_matches_reference(layer, uniformer_reference, GRID.max_tokens)


def test_uniformer_parameter_count_and_block_split():
    """DPE C·9 + C in every block; local: norm, V (C·C' + C'), k×k depthwise (C'·k² + C'), U; global: self-attention."""
    model = build_model(mnist("uniformer"))
    sa = build_model(mnist("self_attention", position="none"))
    c, inner, k = 192, 192, 3
    dpe = c * 9 + c
    local = 2 * c + c * inner + inner + inner * k * k + inner + inner * c + c
    kinds = [type(block.attn.aggregator).__name__ for block in model.encoder.blocks]
    assert kinds == ["LocalRelationAggregator"] * 3 + ["SelfAttention"] * 3
    assert count_parameters(model.encoder.blocks[0].attn) == dpe + local
    sa_layer = count_parameters(sa.encoder.blocks[0].attn)
    assert count_parameters(model.encoder.blocks[5].attn) == dpe + sa_layer
    assert count_parameters(model) == count_parameters(sa) + 6 * dpe + 3 * (local - sa_layer) == 2_493_418
    assert [type(b.attn.aggregator).__name__ for b in build_model(mnist("uniformer", local_blocks=1)).encoder.blocks
            ].count("LocalRelationAggregator") == 1


# -- MixFormer ------------------------------------------------------------------------------------------

def mixformer_reference(layer: MixFormerMixer, x: Tensor) -> Tensor:
    """Both branches and both interactions, the window attention token by token."""
    gelu, sigmoid = torch.nn.functional.gelu, torch.sigmoid

    def linear(module: torch.nn.Linear, t: Tensor) -> Tensor:
        return t @ module.weight.T + (0 if module.bias is None else module.bias)

    def bottleneck(seq: torch.nn.Sequential, t: Tensor) -> Tensor:
        return linear(seq[2], gelu(linear(seq[0], t)))

    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), layer.norm.weight, layer.norm.bias)
    conv = gelu(depthwise_reference(layer.conv.conv, GRID, linear(layer.conv_in, xn)))
    gap = conv[:, 1:].sum(dim=1) / GRID.height / GRID.width
    s = sigmoid(bottleneck(layer.channel_interaction, gap))
    q, k, v = linear(layer.qkv_proj, linear(layer.attn_in, xn)).chunk(3, dim=-1)
    v = v * s[:, None]
    d, w = layer.dim_head, layer.window

    def window_of(i: int) -> tuple[int, int] | None:
        return None if i == 0 else tuple(p // w for p in divmod(i - 1, GRID.width))

    n = x.shape[1]
    rows = []
    for i in range(n):
        keys = [j for j in range(n) if i == 0 or j == 0 or window_of(i) == window_of(j)]
        heads = []
        for t in range(q.shape[-1] // d):
            part = slice(t * d, (t + 1) * d)
            weights = torch.stack([(q[:, i, part] * k[:, j, part]).sum(-1) for j in keys], -1).div(math.sqrt(d))
            heads.append(sum(weights.softmax(-1)[:, m, None] * v[:, j, part] for m, j in enumerate(keys)))
        rows.append(torch.cat(heads, dim=-1))
    attn = torch.stack(rows, dim=1)
    m = sigmoid(bottleneck(layer.spatial_interaction, attn))
    return layer.out_proj(torch.cat([attn, linear(layer.conv_out, conv) * m], dim=-1))


@pytest.mark.parametrize("window", [2, 3, 4])
def test_mixformer_matches_the_papers_formula(window):
    layer = MixFormerMixer(GRID, DIM, HEADS, 4, window)
    assert_matches_reference(layer, mixformer_reference, GRID.max_tokens)


def test_mixformer_parameter_count():
    """norm; W_a, W_c, DWConv, W_p; W_qkv; channel C→C/8→A; spatial A→A/8→1; out_proj C'→C."""
    model = build_model(mnist("mixformer"))
    c, half = 192, 96
    layer = (2 * c + (c * half + half) + (c * c + c) + (9 * c + c) + (c * half + half) + half * 3 * half
             + (c * 24 + 24 + 24 * half + half) + (half * 12 + 12 + 12 + 1) + (2 * half * c + c))
    assert count_parameters(model.encoder.blocks[0].attn) == layer
    sa = build_model(mnist("self_attention", position="none"))
    assert count_parameters(model) == count_parameters(sa) + 6 * (layer - count_parameters(sa.encoder.blocks[0].attn)) \
        == 2_704_528


# -- shared checks ----------------------------------------------------------------------------------

TINY = dict(dim=16, heads=2, dim_head=8, depth=2, mlp_dim=32)
SHAPES = {"vit": dict(image_size=12, patch_size=4, channels=1, num_classes=5),
          "gpt": dict(context_length=9, vocab_size=20)}
MIXER_ARCHS = [("vit", "acmix"), ("vit", "shift_structure"), ("gpt", "shift_structure"), ("vit", "uniformer"),
               ("vit", "mixformer")]


def tiny(arch: str, attention: str) -> ModelConfig:
    return ModelConfig(arch=arch, attention=attention, **TINY, **SHAPES[arch])


def inputs(cfg: ModelConfig, batch: int = 3) -> Tensor:
    if cfg.arch == "vit":
        return torch.randn(batch, cfg.channels, *cfg.image_hw)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))


def counted_flops(model: torch.nn.Module, x: Tensor, backward: bool) -> dict[str, int]:
    """FLOPs by aten operator, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("arch,attention", MIXER_ARCHS)
def test_flop_census_equals_torch_flop_counter(arch, attention):
    """Every matmul and convolution forward, and every matmul's backward. Left out: CPU SDPA (no FLOP
    formula) and the backward of depthwise convolutions, which FlopCounterMode counts as if ungrouped."""
    cfg = tiny(arch, attention)
    torch.manual_seed(0)
    model, x = build_model(cfg), inputs(cfg)
    counted = [t for t in flop_terms(cfg) if t.matmul and "attention products" not in t.name]
    convolutions = sum(t.forward for t in counted if "depthwise" in t.name)
    assert sum(counted_flops(model, x, backward=False).values()) == 3 * sum(t.forward for t in counted)
    both = counted_flops(model, x, backward=True)
    both.pop("aten.convolution_backward", None)
    assert sum(both.values()) == 3 * (sum(t.executed for t in counted) - 2 * convolutions)
    assert any("attention products" in t.name for t in flop_terms(cfg))


@pytest.mark.parametrize("arch,attention", MIXER_ARCHS)
def test_mixer_builds_on_meta_and_materialises(arch, attention):
    cfg = tiny(arch, attention)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    assert torch.isfinite(model(inputs(cfg))).all()


def test_gpt_mixers_are_causal():
    cfg = tiny("gpt", "shift_structure")
    model = build_model(cfg)
    tokens = inputs(cfg)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(tokens)[:, :5], model(changed)[:, :5])
    assert not torch.allclose(model(tokens)[:, 5:], model(changed)[:, 5:])


@pytest.mark.parametrize("changes,message", [
    (dict(arch="gpt"), "attention=acmix is defined for arch=vit only, got arch=gpt"),
    (dict(arch="vit", mixer_kernel=4), "mixer_kernel must be odd"),
    (dict(arch="vit", position="rope"), "takes position=none or learned"),
    (dict(arch="vit", relative="v"), "relative='v' applies to attention=translution or alpha only"),
    (dict(arch="vit", relative_blocks=1), "relative_blocks applies to attention=translution or alpha"),
    (dict(arch="vit", local_blocks=1), "local_blocks applies to attention=uniformer only"),
    (dict(arch="vit", attention="uniformer", local_blocks=7), r"local_blocks \(7\) exceeds depth \(6\)"),
    (dict(arch="gpt", attention="uniformer"), "attention=uniformer is defined for arch=vit only"),
    (dict(arch="vit", attention="mixformer", dim_head=7), "dim_head for its attention branch: it must be even"),
])
def test_mixer_config_errors_name_the_field(changes, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig.model_validate({"attention": "acmix", "image_size": 12, "patch_size": 4, **changes})
