"""Official weights import: our models after ``load_official`` compute the official function.

The official repository is not a dependency, so this file holds an independent forward pass
written from the official formulas: official parameter names and shapes, the official index
maps built by loops, per-pair projections by the official broadcasting
``x[b, 1, n, 1, C] @ W[index_map][1, n, n, C, C']`` and the official head rearranges (the
bank on the query token is transposed, the others are not). Everything runs in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from translution_dist.models import ModelConfig, build_model, count_parameters
from translution_dist.models.official import (
    OfficialWeightsError,
    from_official,
    load_official,
    read_official_checkpoint,
    to_official,
)

DIM, HEADS, DIM_HEAD, DEPTH, MLP, RANK = 16, 2, 4, 2, 24, 2
GRID, PATCH, CHANNELS, CLASSES = 3, 2, 3, 5
CONTEXT, VOCAB = 8, 11
BUFFERS = ("causal", "cos_cached", "sin_cached")  # official constant buffers saved in the state dict


def vit_config(attention: str, **extra) -> ModelConfig:
    fields = dict(dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, mlp_dim=MLP, alpha_rank=RANK,
                  image_size=GRID * PATCH, patch_size=PATCH, channels=CHANNELS, num_classes=CLASSES)
    return ModelConfig(arch="vit", attention=attention, **{**fields, **extra})


def gpt_config(attention: str, **extra) -> ModelConfig:
    fields = dict(dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, mlp_dim=MLP, alpha_rank=RANK,
                  context_length=CONTEXT, vocab_size=VOCAB)
    return ModelConfig(arch="gpt", attention=attention, **{**fields, **extra})


# ---- official index maps (SharedParameterRelCls; CausalSharedParameter / …2) ----

def grid_index_map(h: int, w: int) -> Tensor:
    patch = (2 * h - 1) * (2 * w - 1)
    rows = [[patch] + [patch + 1] * (h * w)]
    for x in range(h):
        for y in range(w):
            row = [patch + 2]
            for i in range(h):
                for j in range(w):
                    row.append((x - i + h - 1) * (2 * w - 1) + (y - j + w - 1))
            rows.append(row)
    return torch.tensor(rows)


def causal_index_maps(t: int) -> tuple[Tensor, Tensor]:
    """(CausalSharedParameter: max(0, i−j), CausalSharedParameter2: min(0, i−j) + t − 1)."""
    first = torch.tensor([[max(0, i - j) for j in range(t)] for i in range(t)])
    second = torch.tensor([[min(0, i - j) + t - 1 for j in range(t)] for i in range(t)])
    return first, second


# ---- official rotary caches (RotaryPositionalEmbeddings; RoPE2DWithCLS) ----

def inverse_frequencies(d: int) -> Tensor:
    return 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))


def rope_cache(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """``cos_cached``, ``sin_cached``: ``[1, 1, T, d]`` (GPT) or ``[1, H, W, d]`` (ViT, rows' then columns' half)."""
    d = cfg.dims.dim_head
    if cfg.arch == "gpt":
        freqs = torch.einsum("i,j->ij", torch.arange(CONTEXT).float(), inverse_frequencies(d))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]
    h, w = cfg.grid_hw
    freqs_h = torch.einsum("i,j->ij", torch.arange(h).float(), inverse_frequencies(d // 2))
    freqs_w = torch.einsum("i,j->ij", torch.arange(w).float(), inverse_frequencies(d // 2))
    freqs = torch.cat([freqs_h[:, None, :].repeat(1, w, 1), freqs_w[None, :, :].repeat(h, 1, 1)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None], emb.sin()[None]


def rotate(x: Tensor, cos: Tensor, sin: Tensor, cfg: ModelConfig) -> Tensor:
    """Official ``x·cos + rotate_half(x)·sin`` on ``[b, h, n, d]``; a ViT's class token stays as it is."""
    def apply(t: Tensor, c: Tensor, s: Tensor) -> Tensor:
        half = t.shape[-1] // 2
        return t * c + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * s

    if cfg.arch == "gpt":
        n = x.shape[2]
        return apply(x, cos[:, :, :n], sin[:, :, :n])
    d = x.shape[-1]
    return torch.cat([x[:, :, :1], apply(x[:, :, 1:], cos.reshape(1, -1, d), sin.reshape(1, -1, d))], dim=2)


# ---- a random official state dict, named and shaped as the official modules are ----

def is_relative_block(cfg: ModelConfig, i: int) -> bool:
    return cfg.attention != "self_attention" and i < cfg.num_relative_blocks


def official_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = cfg.dims
    inner, low = dims.heads * dims.dim_head, dims.heads * RANK

    def rnd(*shape: int, scale: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        sd[f"{name}.weight"] = rnd(fan_out, fan_in, scale=fan_in ** -0.5)
        if bias:
            sd[f"{name}.bias"] = rnd(fan_out, scale=0.1)

    def norm(name: str, width: int) -> None:
        sd[f"{name}.weight"] = 1 + rnd(width, scale=0.1)
        sd[f"{name}.bias"] = rnd(width, scale=0.1)

    sd: dict[str, Tensor] = {}
    k = cfg.layout().num_displacements
    root = "transformer" if cfg.attention == "self_attention" else "translution"
    rel = cfg.relative
    for i in range(DEPTH):
        a = f"{root}.layers.{i}.0"
        relative = is_relative_block(cfg, i)
        norm(f"{a}.norm", DIM)
        if not (dims.heads == 1 and dims.dim_head == DIM):  # else to_out is the identity
            linear(f"{a}.to_out.0", inner, DIM)
        if not relative or cfg.attention == "alpha":
            linear(f"{a}.to_qkv", DIM, 3 * inner, bias=False)
        if relative and cfg.attention == "alpha":
            if "q" in rel or "k" in rel:
                linear(f"{a}.to_q1", DIM, low, bias=False)
                linear(f"{a}.to_k1", DIM, low, bias=False)
            if "v" in rel:
                linear(f"{a}.to_v1", DIM, low, bias=False)
                linear(f"{a}.to_v3", low, inner, bias=False)
            for side in rel:
                sd[f"{a}.to_{side}2.unique_params"] = rnd(k, low, low, scale=0.6)
        if relative and cfg.attention == "translution":
            for side in rel:
                sd[f"{a}.to_{side}.unique_params"] = rnd(k, DIM, inner, scale=0.4)
            plain = "".join(side for side in "qkv" if side not in rel)
            if plain:
                linear(f"{a}.to_{plain}", DIM, len(plain) * inner, bias=False)
        if cfg.arch == "gpt" and (relative or cfg.attention == "self_attention"):  # hybrids' Attention: none
            sd[f"{a}.causal"] = torch.tril(torch.ones(CONTEXT, CONTEXT)).view(1, 1, CONTEXT, CONTEXT)
        if cfg.rotary and (relative or cfg.attention == "self_attention"):
            name = "rotary_emb" if cfg.arch == "gpt" else "rope"
            sd[f"{a}.{name}.cos_cached"], sd[f"{a}.{name}.sin_cached"] = rope_cache(cfg)
        f = f"{root}.layers.{i}.1.net"
        norm(f"{f}.0", DIM)
        linear(f"{f}.1", DIM, MLP)
        linear(f"{f}.4", MLP, DIM)
    norm(f"{root}.norm", DIM)
    if cfg.arch == "vit":
        (ph, pw), patches = cfg.patch_hw, cfg.num_patches
        patch_dim = ph * pw * CHANNELS
        norm("to_patch_embedding.1", patch_dim)
        linear("to_patch_embedding.2", patch_dim, DIM)
        norm("to_patch_embedding.3", DIM)
        sd["cls_token"] = rnd(1, 1, DIM, scale=1.0)
        if cfg.learned_position:
            sd["pos_embedding"] = rnd(1, patches + 1, DIM, scale=1.0)
        linear("mlp_head", DIM, CLASSES)
    else:
        sd["wte.weight"] = rnd(VOCAB, DIM, scale=1.0)
        if cfg.learned_position:
            sd["wpe.weight"] = rnd(CONTEXT, DIM, scale=1.0)
        norm("norm", DIM)
        linear("output_head", DIM, VOCAB, bias=False)
    return sd


def official_parameter_count(official: dict[str, Tensor]) -> int:
    return sum(t.numel() for key, t in official.items() if key.rsplit(".", 1)[-1] not in BUFFERS)


# ---- the official forward ----

def per_pair(x: Tensor, bank: Tensor, index_map: Tensor, on_query_token: bool, heads: int) -> Tensor:
    """``[b, h, n, n, d]``: official ``(x.unsqueeze(1).unsqueeze(3) @ W[index_map]).squeeze(3)`` and rearrange."""
    projected = torch.matmul(x.unsqueeze(1).unsqueeze(3), bank[index_map].unsqueeze(0)).squeeze(3)
    b, n, m, _ = projected.shape
    split = projected.view(b, n, m, heads, -1)
    return split.permute(0, 3, 2, 1, 4) if on_query_token else split.permute(0, 3, 1, 2, 4)


def heads_of(t: Tensor, heads: int) -> Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def merge(t: Tensor) -> Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def linear(p: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def layer_norm(p: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def attend(dots: Tensor, causal: bool) -> Tensor:
    if causal:
        n = dots.shape[-1]
        dots = dots.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
    return dots.softmax(dim=-1)


def to_out(p, a: str, out: Tensor) -> Tensor:
    return linear(p, f"{a}.to_out.0", out) if f"{a}.to_out.0.weight" in p else out  # nn.Identity otherwise


def official_attention(p, a: str, x: Tensor, cfg: ModelConfig, maps: dict[str, Tensor], query_projection: str,
                       relative: bool, causal: bool) -> Tensor:
    scale = cfg.dims.dim_head ** -0.5
    heads = cfg.dims.heads
    rope_name = "rotary_emb" if cfg.arch == "gpt" else "rope"
    rope = (p[f"{a}.{rope_name}.cos_cached"], p[f"{a}.{rope_name}.sin_cached"]) if cfg.rotary and (
        relative or cfg.attention == "self_attention") else None
    query_name = query_projection[-1]
    key_name = "q" if query_name == "k" else "k"
    rel = cfg.relative
    x = layer_norm(p, f"{a}.norm", x)
    if not relative or cfg.attention in ("self_attention", "alpha"):
        q1, k1, v1 = (heads_of(t, heads) for t in linear(p, f"{a}.to_qkv", x).chunk(3, dim=-1))
        if rope is not None:
            q1, k1 = rotate(q1, *rope, cfg), rotate(k1, *rope, cfg)
    if not relative or cfg.attention == "self_attention":
        attn = attend(q1 @ k1.transpose(-1, -2) * scale, causal)
        return to_out(p, a, merge(attn @ v1))
    if cfg.attention == "alpha":  # LoR_{subset}Translution
        dots = q1 @ k1.transpose(-1, -2)
        if "q" in rel or "k" in rel:
            q2, k2 = linear(p, f"{a}.to_{query_name}1", x), linear(p, f"{a}.to_{key_name}1", x)
            q2 = (per_pair(q2, p[f"{a}.to_{query_name}2.unique_params"], maps["query"], True, heads) if "q" in rel
                  else heads_of(q2, heads).unsqueeze(3))
            k2 = (per_pair(k2, p[f"{a}.to_{key_name}2.unique_params"], maps["key"], False, heads) if "k" in rel
                  else heads_of(k2, heads).unsqueeze(2))
            dots = (dots + (q2 * k2).sum(-1)) / 2
        attn = attend(dots * scale, causal)
        out = merge(attn @ v1)
        if "v" in rel:
            v2 = per_pair(linear(p, f"{a}.to_v1", x), p[f"{a}.to_v2.unique_params"], maps["key"], False, heads)
            out = (out + linear(p, f"{a}.to_v3", merge((attn.unsqueeze(-1) * v2).sum(3)))) / 2
        return to_out(p, a, out)
    # Translution: a bank per relative side; plain sides broadcast over the other token.
    plain = "".join(side for side in "qkv" if side not in rel)
    plain_out = dict(zip(plain, linear(p, f"{a}.to_{plain}", x).chunk(len(plain), dim=-1))) if plain else {}
    names = {"q": query_name, "k": key_name, "v": "v"}
    pair = {}
    for side in "qkv":
        if side in plain_out:
            t = heads_of(plain_out[side], heads)
            if rope is not None and side in "qk":
                t = rotate(t, *rope, cfg)
            pair[side] = t.unsqueeze(3) if side == "q" else t.unsqueeze(2)
        else:
            pair[side] = per_pair(x, p[f"{a}.to_{names[side]}.unique_params"],
                                  maps["query" if side == "q" else "key"], side == "q", heads)
    attn = attend((pair["q"] * pair["k"]).sum(-1) * scale, causal)
    return to_out(p, a, merge((attn.unsqueeze(-1) * pair["v"]).sum(3)))


def official_encoder(p, x: Tensor, cfg: ModelConfig, maps, query_projection: str,
                     causal_plain_blocks: bool = True) -> Tensor:
    """``causal_plain_blocks=False`` is the official GPT hybrid, whose Attention blocks have no causal mask."""
    root = "transformer" if cfg.attention == "self_attention" else "translution"
    for i in range(DEPTH):
        relative = is_relative_block(cfg, i)
        causal = cfg.arch == "gpt" and (relative or cfg.attention == "self_attention" or causal_plain_blocks)
        x = official_attention(p, f"{root}.layers.{i}.0", x, cfg, maps, query_projection, relative, causal) + x
        f = f"{root}.layers.{i}.1.net"
        x = linear(p, f"{f}.4", F.gelu(linear(p, f"{f}.1", layer_norm(p, f"{f}.0", x)))) + x
    return layer_norm(p, f"{root}.norm", x)


def official_vit(p, images: Tensor, cfg: ModelConfig, query_projection: str) -> Tensor:
    (ph, pw), (rows, cols) = cfg.patch_hw, cfg.grid_hw
    patches = []
    for row in range(rows):
        for col in range(cols):
            patch = images[:, :, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw]
            patches.append(patch.permute(0, 2, 3, 1).reshape(images.shape[0], -1))  # (p1 p2 c)
    x = layer_norm(p, "to_patch_embedding.3", linear(p, "to_patch_embedding.2",
                                                      layer_norm(p, "to_patch_embedding.1", torch.stack(patches, 1))))
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    if "pos_embedding" in p:
        x = x + p["pos_embedding"]
    index_map = grid_index_map(rows, cols)
    x = official_encoder(p, x, cfg, {"key": index_map, "query": index_map}, query_projection)
    return linear(p, "mlp_head", x.mean(dim=1) if cfg.pool == "mean" else x[:, 0])


def official_gpt(p, tokens: Tensor, cfg: ModelConfig, query_projection: str,
                 causal_plain_blocks: bool = True) -> Tensor:
    n = tokens.shape[1]
    x = p["wte.weight"][tokens]
    if "wpe.weight" in p:
        x = x + p["wpe.weight"][:n]
    first, second = causal_index_maps(CONTEXT)  # the official maps, cut to the sequence
    maps = {"key": first[:n, :n], "query": second[:n, :n]}
    x = official_encoder(p, x, cfg, maps, query_projection, causal_plain_blocks)
    return linear(p, "output_head", layer_norm(p, "norm", x))


def imported(cfg: ModelConfig, official: dict[str, Tensor], query_projection: str | None) -> torch.nn.Module:
    model = build_model(cfg).double()
    load_official(model, official, query_projection=query_projection)
    return model.eval()


def inputs(cfg: ModelConfig, n: int = CONTEXT) -> Tensor:
    if cfg.arch == "gpt":
        return torch.randint(0, VOCAB, (2, n))
    return torch.randn(2, CHANNELS, *cfg.image_hw, dtype=torch.float64)


def official_forward(cfg: ModelConfig, official, x: Tensor, query_projection: str) -> Tensor:
    return (official_vit if cfg.arch == "vit" else official_gpt)(official, x, cfg, query_projection)


RELATIVE = [pytest.param(attention, qp, id=f"{attention}-{qp}")
            for attention in ("translution", "alpha") for qp in ("to_k", "to_q")]


@pytest.mark.parametrize("attention,query_projection", [*RELATIVE, pytest.param("self_attention", "to_k")])
@pytest.mark.parametrize("bank_chunks", [1, 3])
def test_vit_import_matches_official_forward(attention, query_projection, bank_chunks):
    extra = {} if attention == "self_attention" else {"bank_chunks": bank_chunks}
    cfg = vit_config(attention, **extra)
    official = official_state_dict(cfg)
    images = inputs(cfg)
    expected = official_vit(official, images, cfg, query_projection)
    torch.testing.assert_close(imported(cfg, official, query_projection)(images), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention,query_projection", [*RELATIVE, pytest.param("self_attention", "to_k")])
@pytest.mark.parametrize("n", [CONTEXT, 5])
def test_gpt_import_matches_official_forward(attention, query_projection, n):
    extra = {} if attention == "self_attention" else {"bank_chunks": 3}
    cfg = gpt_config(attention, **extra)
    official = official_state_dict(cfg)
    tokens = torch.randint(0, VOCAB, (2, n))
    expected = official_gpt(official, tokens, cfg, query_projection)
    torch.testing.assert_close(imported(cfg, official, query_projection)(tokens), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("relative", ["qk", "kv", "v", "q"])
def test_gpt_translution_subsets_import(relative):
    cfg = gpt_config("translution", relative=relative)
    official = official_state_dict(cfg)
    tokens = torch.randint(0, VOCAB, (2, CONTEXT))
    expected = official_gpt(official, tokens, cfg, "to_q")
    torch.testing.assert_close(imported(cfg, official, "to_q")(tokens), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", ["translution", "alpha"])
@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_query_projection_direction_matters(arch, attention):
    """Reading the weights with the other convention gives another function: the test above is not vacuous."""
    cfg = vit_config(attention) if arch == "vit" else gpt_config(attention)
    official = official_state_dict(cfg)
    x = inputs(cfg)
    right, wrong = imported(cfg, official, "to_k")(x), imported(cfg, official, "to_q")(x)
    assert not torch.allclose(right, wrong, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cfg", [vit_config("translution", bank_chunks=4), vit_config("alpha", bank_chunks=2),
                                 vit_config("self_attention"), gpt_config("translution", bank_chunks=3),
                                 gpt_config("alpha"), gpt_config("translution", relative="kv")],
                         ids=["vit-translution", "vit-alpha", "vit-sa", "gpt-translution", "gpt-alpha", "gpt-kv"])
def test_round_trip(cfg):
    official = official_state_dict(cfg)
    back = to_official(from_official(official, cfg, query_projection="to_q"), cfg, query_projection="to_q")
    assert back.keys() == official.keys()
    for key in official:
        assert torch.equal(back[key].to(official[key].dtype), official[key]), key
    swapped = "to_k" if cfg.relative == "qkv" else "to_q"  # the to_k files have no subsets
    ours = build_model(cfg).state_dict()
    again = from_official(to_official(ours, cfg, query_projection=swapped), cfg, query_projection=swapped)
    assert again.keys() == ours.keys() and all(torch.equal(again[key], ours[key]) for key in ours)


def test_causal_buffers_are_optional_on_import():
    cfg = gpt_config("translution")
    official = {k: v for k, v in official_state_dict(cfg).items() if not k.endswith(".causal")}
    assert from_official(official, cfg, query_projection="to_q").keys() == build_model(cfg).state_dict().keys()


def test_unknown_missing_and_misshaped_keys_are_listed():
    cfg = vit_config("translution")
    official = official_state_dict(cfg)
    del official["translution.layers.1.0.to_v.unique_params"]
    official["pos_embedding"] = torch.zeros(1, GRID * GRID + 1, DIM)
    official["mlp_head.weight"] = torch.zeros(CLASSES + 1, DIM)
    with pytest.raises(OfficialWeightsError) as err:
        from_official(official, cfg, query_projection="to_k")
    message = str(err.value)
    assert "missing keys (1)" in message and "translution.layers.1.0.to_v.unique_params" in message
    assert "unexpected keys (1)" in message and "pos_embedding" in message
    assert "mlp_head.weight: expected [5, 16], got [6, 16]" in message


def test_configs_without_an_official_counterpart_are_refused():
    with pytest.raises(OfficialWeightsError, match="position=rope"):
        from_official({}, vit_config("self_attention", position="rope"), query_projection="to_q")
    with pytest.raises(OfficialWeightsError, match="use query_projection='to_q'"):
        from_official({}, gpt_config("translution", relative="kv"), query_projection="to_k")


@pytest.mark.parametrize("cfg", [vit_config("translution"), vit_config("alpha"), gpt_config("translution")],
                         ids=["vit-translution", "vit-alpha", "gpt-translution"])
def test_query_projection_is_required_where_both_conventions_load(cfg):
    """The current ViT translution.py (ef01c2b on) needs to_q, the one up to 0845c3e to_k, and both load."""
    official = official_state_dict(cfg)
    with pytest.raises(OfficialWeightsError, match="0845c3e.*ef01c2b"):
        from_official(official, cfg)
    with pytest.raises(OfficialWeightsError, match="query_projection is required"):
        to_official(build_model(cfg).state_dict(), cfg)


def test_query_projection_is_inferred_where_only_to_q_files_have_the_model():
    cfg = gpt_config("translution", relative="kv")
    official = official_state_dict(cfg)
    tokens = torch.randint(0, VOCAB, (2, CONTEXT))
    model = build_model(cfg).double()
    load_official(model, official)
    torch.testing.assert_close(model(tokens), official_gpt(official, tokens, cfg, "to_q"), rtol=1e-10, atol=1e-12)
    assert to_official(model.state_dict(), cfg).keys() == official.keys()


def test_read_official_checkpoint_unwraps_training_checkpoints(tmp_path):
    weights = {"module.cls_token": torch.ones(1, 1, 4), "module.mlp_head.weight": torch.zeros(2, 4)}
    torch.save({"epoch": 3, "arch": "lution_vit_tiny", "state_dict": weights}, tmp_path / "checkpoint.pth.tar")
    loaded = read_official_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert sorted(loaded) == ["cls_token", "mlp_head.weight"]
    torch.save({"cls_token": torch.ones(1)}, tmp_path / "bare.pth")
    assert list(read_official_checkpoint(tmp_path / "bare.pth")) == ["cls_token"]


# ---- every official model besides the full Translution/α of the first tests ----

OFFICIAL = "official"
NEW_CASES = {
    # lor_translution.py: LoR_KV, LoR_QK, LoR_QV, LoR_Q, LoR_K, LoR_V (LoR_QKV is "alpha" above)
    **{f"gpt-lor-{rel}": gpt_config("alpha", relative=rel, bank_chunks=2) for rel in ("kv", "qk", "qv", "q", "k", "v")},
    **{f"vit-lor-{rel}": vit_config("alpha", relative=rel) for rel in ("kv", "q", "k", "v")},
    # ViT/models/translution.py from ef01c2b on: subsets on an image grid
    "vit-kv": vit_config("translution", relative="kv", bank_chunks=3),
    "vit-q": vit_config("translution", relative="q"),
    # hybrids (tln_num): the first blocks relative, the rest Attention
    "vit-qkv-hybrid": vit_config("translution", relative_blocks=1),
    "vit-lor-qkv-hybrid": vit_config("alpha", relative_blocks=1),
    "vit-translution-no-relative-blocks": vit_config("translution", relative_blocks=0),
    "gpt-qk-hybrid": gpt_config("translution", relative="qk", relative_blocks=1),
    # RoPE: rope_transformer.py (ViT adds a learned embedding), rope_translution.py, lor_rope_translution.py
    "vit-rope-transformer": vit_config("self_attention", position="learned+rope", rope_convention=OFFICIAL),
    "gpt-rope-transformer": gpt_config("self_attention", position="rope", rope_convention=OFFICIAL),
    "vit-rope-translution": vit_config("translution", relative="v", position="rope", rope_convention=OFFICIAL),
    "vit-rope-translution-hybrid-pos": vit_config("translution", relative="v", position="learned+rope",
                                                  rope_convention=OFFICIAL, relative_blocks=1),
    "vit-lor-rope": vit_config("alpha", relative="v", position="rope", rope_convention=OFFICIAL),
    "vit-lor-rope-hybrid": vit_config("alpha", relative="v", position="rope", rope_convention=OFFICIAL,
                                      relative_blocks=1),
    "gpt-rope-translution": gpt_config("translution", relative="v", position="rope", rope_convention=OFFICIAL),
    "gpt-lor-rope-qkv": gpt_config("alpha", position="rope", rope_convention=OFFICIAL),
    # pool='mean', rectangular images and patches, one head as wide as the model (to_out = Identity)
    "vit-mean-pool": vit_config("translution", relative="kv", pool="mean"),
    "vit-rectangular": vit_config("translution", relative="qk", image_size=[6, 8], patch_size=[3, 2]),
    "vit-rectangular-rope": vit_config("alpha", relative="v", image_size=[4, 6], patch_size=2, position="rope",
                                       rope_convention=OFFICIAL),
    "vit-one-wide-head": vit_config("translution", relative="kv", heads=1, dim_head=DIM),
    "gpt-one-wide-head-sa": gpt_config("self_attention", heads=1, dim_head=DIM),
    "vit-dropout": vit_config("alpha", relative="qv", dropout=0.3, emb_dropout=0.2),
}


@pytest.mark.parametrize("name", NEW_CASES)
def test_official_model_imports_exactly(name):
    """float64 outputs equal the official formulas; query_projection is inferred (to_q files only)."""
    cfg = NEW_CASES[name]
    official = official_state_dict(cfg)
    x = inputs(cfg)
    expected = official_forward(cfg, official, x, "to_q")
    query_projection = "to_q" if cfg.relative == "qkv" and cfg.attention != "self_attention" and not (
        cfg.relative_blocks is not None or cfg.rotary) else None
    model = imported(cfg, official, query_projection)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
    assert count_parameters(model) == official_parameter_count(official)


@pytest.mark.parametrize("name", NEW_CASES)
def test_official_model_export_round_trip_is_exact(name):
    """official → ours → official gives back every tensor bit for bit, the constant buffers included."""
    cfg = NEW_CASES[name]
    official = official_state_dict(cfg)
    back = to_official(from_official(official, cfg, query_projection="to_q"), cfg, query_projection="to_q")
    assert back.keys() == official.keys()
    for key in official:
        assert torch.equal(back[key].to(official[key].dtype), official[key]), key


def test_gpt_hybrid_stays_causal_unlike_the_official_one():
    """The official GPT hybrids' Attention blocks see future tokens; ours are causal (docs/official_weights.md)."""
    cfg = gpt_config("translution", relative_blocks=1)
    official = official_state_dict(cfg)
    tokens = inputs(cfg)
    ours = imported(cfg, official, None)(tokens)
    torch.testing.assert_close(ours, official_gpt(official, tokens, cfg, "to_q"), rtol=1e-10, atol=1e-12)
    leaky = official_gpt(official, tokens, cfg, "to_q", causal_plain_blocks=False)
    assert not torch.allclose(ours, leaky, rtol=1e-3, atol=1e-3)
    # the last position sees every token in both: there they agree
    torch.testing.assert_close(ours[:, -1], leaky[:, -1], rtol=1e-10, atol=1e-12)


def test_rope_conventions_differ_and_only_the_official_one_imports():
    cfg = vit_config("alpha", relative="v", position="rope", rope_convention=OFFICIAL)
    project = cfg.model_copy(update={"rope_convention": "project"})
    official = official_state_dict(cfg)
    with pytest.raises(OfficialWeightsError, match="set rope_convention: official"):
        from_official(official, project)
    model = imported(cfg, official, None)
    other = build_model(project).double().eval()
    other.load_state_dict(model.state_dict())
    x = inputs(cfg)
    assert not torch.allclose(model(x), other(x), rtol=1e-3, atol=1e-3)


def test_dropout_is_active_in_training_only():
    cfg = NEW_CASES["vit-dropout"]
    model = imported(cfg, official_state_dict(cfg), None)
    x = inputs(cfg)
    torch.manual_seed(0)
    evaluation = model(x)
    model.train()
    assert not torch.allclose(model(x), evaluation)
    assert {type(m).__name__ for m in model.modules()} >= {"Dropout"}
