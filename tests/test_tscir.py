"""TSCIR modules and losses checked against the released code's description (github.com/LiJiaBei-7/TSCIR)
on a tiny randomly initialised 12-block open_clip model, and every loss term against a direct
computation on small hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cir.adapters import ComposeConfig, Composer, LowRankAdapter
from cir.blocks import resolve_blocks
from cir.clip import CIRClip
from cir.losses import (composed_contrastive, contrastive, mixed_hard_negatives, soft_text_alignment)
from cir.mapping import MappingConfig, TokenLearner
from cir.model import CIRModel
from cir.prompts import PromptError, QueryPrompt, fill_template

WIDTH, EMBED, BLOCKS = 32, 24, 12


@pytest.fixture(scope="module")
def tiny12() -> CIRClip:
    """open_clip CLIP: ViT 32 px / patch 8 (a 4 x 4 grid), text tower of 12 blocks of width 32."""
    import open_clip

    from datagen.base.clip_loader import LoadedClip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=24, vocab_size=49408, width=WIDTH, heads=4, layers=BLOCKS))
    tok = open_clip.SimpleTokenizer(context_length=24)
    pre = open_clip.image_transform(32, is_train=False)
    return CIRClip(LoadedClip(model, pre, tok, "tiny-12", "random")).freeze()


def _model(clip, **mapping) -> CIRModel:
    torch.manual_seed(1)
    return CIRModel(clip, MappingConfig(dropout=0.0, **mapping), ComposeConfig()).eval()


def _inputs(clip, b=3):
    torch.manual_seed(2)
    g = F.normalize(torch.randn(b, clip.embed_dim), dim=-1)
    with torch.no_grad():
        _, p = clip.image_features(torch.randn(b, 3, 32, 32), patches=True)
    return g, p


def test_block_choices_of_the_released_code_and_their_analogues():
    assert resolve_blocks("tscir-vsi", 12) == [3, 7, 9, 11]
    assert resolve_blocks("every-other", 12) == [1, 3, 5, 7, 9, 11]
    assert resolve_blocks("tscir-vsi", 4) == [0, 2, 3] and resolve_blocks("every-other", 4) == [1, 3]
    assert resolve_blocks([-1, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="block 12"):
        resolve_blocks([12], 12)


def test_token_learner_is_pic2words_im2text(tiny12):
    tl = TokenLearner(EMBED, WIDTH, MappingConfig())
    linears = [m for m in tl.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(EMBED, 512), (512, 512), (512, WIDTH)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in tl.modules()) == 2
    assert tl(torch.randn(5, EMBED)).shape == (5, 1, WIDTH)
    # The ViT-L/14 sizes of the released code: 768 -> 512 -> 512 -> 768.
    big = TokenLearner(768, 768, MappingConfig())
    assert sum(p.numel() for p in big.parameters()) == 768 * 512 + 512 + 512 * 512 + 512 + 512 * 768 + 768


def test_visual_tokens_are_the_projected_patch_grid(tiny12):
    _, p = _inputs(tiny12)
    assert p.shape == (3, 16, EMBED) and tiny12.vision_width == EMBED


def _record_blocks(model: CIRModel, g, p, prompts):
    """Hidden states [B, L, W] after every block and its hooks, with a recording last hook."""
    seen = {}

    def rec(i, x, ctx):
        seen[i] = x.detach().clone()
        return x
    clip = model.clip
    tokens, ph = clip.tokenize_queries(prompts)
    hooks = [model.mapping.vsi.hook(p)] if model.mapping.vsi is not None else []
    with torch.no_grad():
        clip.encode_text(tokens, model.mapping.token_learner(g), ph, hooks + [rec], truncate=False)
    return seen, ph


def test_vsi_changes_only_the_pseudo_token_state_and_only_after_the_named_blocks(tiny12):
    model = _model(tiny12)
    g, p = _inputs(tiny12)
    hook = model.mapping.vsi.hook(p)
    tokens, ph = tiny12.tokenize_queries(["a photo of *", fill_template("a photo of * that {}", "is red"),
                                          QueryPrompt("", " on white")])
    eot = tokens.argmax(-1)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[torch.arange(3), ph] = True
    ctx = {"placeholder_mask": mask, "placeholder_index": ph, "eot_index": eot}
    torch.manual_seed(3)
    x = torch.randn(3, tokens.shape[1], WIDTH)
    changed_blocks = []
    with torch.no_grad():
        for i in range(BLOCKS):
            y = hook(i, x, ctx)
            diff = (y - x).abs().sum(-1) > 0                       # [B, L] positions that changed
            if diff.any():
                changed_blocks.append(i)
                assert torch.equal(diff, mask), f"block {i}: VSI touched positions other than the pseudo token"
    assert changed_blocks == [3, 7, 9, 11]


def test_injector_output_is_non_negative_as_released_and_linear_as_an_option(tiny12):
    g, p = _inputs(tiny12)
    for final_relu in (True, False):
        model = _model(tiny12, vsi_final_relu=final_relu)
        blk = model.mapping.vsi.blocks["3"]
        vis = model.mapping.vsi.proj(p)
        with torch.no_grad():
            out = blk(torch.randn(3, WIDTH), torch.randn(3, WIDTH), vis)
        assert out.shape == (3, WIDTH)
        assert bool((out >= 0).all()) == final_relu


def test_vsi_follows_the_eot_state_as_query_position(tiny12):
    model = _model(tiny12)
    g, p = _inputs(tiny12, b=1)
    blk = model.mapping.vsi.blocks["7"]
    vis = model.mapping.vsi.proj(p)
    h = torch.randn(1, WIDTH)
    with torch.no_grad():
        a = blk(h, torch.randn(1, WIDTH), vis)
        b = blk(h, torch.randn(1, WIDTH), vis)
    assert not torch.allclose(a, b)


def test_adapters_touch_every_position_after_every_other_block_only(tiny12):
    torch.manual_seed(4)
    comp = Composer(tiny12.clip, ComposeConfig())
    x = torch.randn(2, 9, WIDTH)
    touched = []
    with torch.no_grad():
        for i in range(BLOCKS):
            y = comp.hook(i, x, {})
            if not torch.equal(y, x):
                assert ((y - x).abs().sum(-1) > 0).all(), f"block {i}: the adapter skipped positions"
                touched.append(i)
    assert touched == [1, 3, 5, 7, 9, 11]
    a = comp.adapters["1"]
    assert torch.allclose(comp.hook(1, x, {}), x + x @ a.A @ a.B)
    # Released sizes: rank 128 on width 768 after 6 blocks is about 1.18M parameters, N(0,1) x 0.01.
    torch.manual_seed(0)
    big = [LowRankAdapter(768, 128, 0.01) for _ in resolve_blocks("every-other", 12)]
    assert sum(p.numel() for m in big for p in m.parameters()) == 1_179_648
    assert abs(big[0].A.std().item() - 0.01) < 5e-4 and abs(big[0].A.mean().item()) < 5e-4


def test_vsi_runs_before_the_adapter_in_a_block_that_has_both(tiny12):
    model = _model(tiny12)
    g, p = _inputs(tiny12)
    order = []
    vsi_hook = model.mapping.vsi.hook

    def vsi_wrapped(patches):
        inner = vsi_hook(patches)
        return lambda i, x, ctx: (order.append(("vsi", i)) if str(i) in model.mapping.vsi.blocks else None,
                                  inner(i, x, ctx))[1]
    comp_hook = model.composer.hook
    model.mapping.vsi.hook = vsi_wrapped
    model.composer.hook = lambda i, x, ctx: (order.append(("adapter", i)) if str(i) in model.composer.adapters
                                             else None, comp_hook(i, x, ctx))[1]
    with torch.no_grad():
        model.encode_query(g, p, ["a photo of *"] * 3)
    assert order.index(("vsi", 3)) < order.index(("adapter", 3))
    assert order.index(("vsi", 11)) < order.index(("adapter", 11))


def test_placeholder_is_the_template_position_not_a_token_id(tiny12):
    """Shared case 01: a `*` or `$` in the user's text stays text."""
    seen = []
    import cir.clip as cclip

    real = cclip.inject_pseudo_tokens

    def rec(x, is_ph, pseudo):
        seen.append(is_ph[0].nonzero().flatten().tolist())
        return real(x, is_ph, pseudo)
    cclip.inject_pseudo_tokens = rec
    try:
        g, p = _inputs(tiny12, b=1)
        prompt = fill_template("a photo of $ that {}", "has a $5 price tag instead of *10")
        for n in (1, 3):
            m = CIRModel(tiny12, MappingConfig(n_tokens=n, vsi="off")).eval()
            with torch.no_grad():
                m.encode_query(g, None, [prompt])
            assert seen[-1] == list(range(4, 4 + n))
    finally:
        cclip.inject_pseudo_tokens = real
    # `$` and `*` templates give the same tokens; the user's `$` is tokenized as text.
    a, _ = tiny12.tokenize_queries([fill_template("a photo of $ that {}", "has a $5 tag")])
    b, _ = tiny12.tokenize_queries([fill_template("a photo of * that {}", "has a $5 tag")])
    assert torch.equal(a, b)
    assert (a[0] == 259).sum() == 1 and a[0, 4] != 259      # the text's `$` (id 259) is not position 4


def test_template_errors_and_placeholder_out_of_context(tiny12):
    with pytest.raises(PromptError, match="no placeholder"):
        fill_template("a photo that {}", "x")
    with pytest.raises(PromptError, match="more than one"):
        fill_template("a * photo of * that {}", "x")
    long = QueryPrompt("word " * 40, " that is red")
    with pytest.raises(PromptError, match="entry 7.*outside the 24-token"):
        tiny12.tokenize_queries([long], where=["entry 7"])
    assert tiny12.placeholder_fits([long, "a photo of *"]) == [False, True]


# ---------------------------------------------------------------- losses on hand-made tensors


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


Q = _unit([1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0], [0.7, 0.7, 0.1])
T = _unit([0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.3, 0.9], [0.5, 0.6, 0.5])
C = _unit([1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.3, 0.3, 1.0], [0.6, 0.5, 0.2])


def _ce(logits_row, label):
    return -(logits_row[label] - math.log(sum(math.exp(v) for v in logits_row)))


def test_contrastive_equals_the_formula():
    s = 1 / 0.07
    direct = 0
    for i in range(4):
        direct += _ce([s * float(Q[i] @ T[j]) for j in range(4)], i) / 8
        direct += _ce([s * float(T[i] @ Q[j]) for j in range(4)], i) / 8
    assert abs(contrastive(Q, T, s).item() - direct) < 1e-9


def test_soft_text_alignment_is_kl_of_image_pattern_to_pseudo_sentence_pattern():
    s = 1 / 0.07
    direct = 0
    for i in range(4):
        p = [math.exp(s * float(C[i] @ Q[j])) for j in range(4)]
        q = [math.exp(s * float(C[i] @ T[j])) for j in range(4)]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        direct += sum(q[j] * (math.log(q[j]) - math.log(p[j])) for j in range(4)) / 4
    assert abs(soft_text_alignment(C, Q, T, s).item() - direct) < 1e-9


def _mixed_direct(k):
    out = []
    for i in range(4):
        wrong = sorted((j for j in range(4) if j != i), key=lambda j: -float(Q[i] @ T[j]))[:k]
        sims = [float(T[i] @ T[j]) for j in range(4)]
        lo, hi = min(sims), max(sims)
        row = []
        for j in wrong:
            w = (sims[j] - lo) / (hi - lo + 1e-8)
            h = w * T[i] + (1 - w) * T[j]
            row.append(float(Q[i] @ h))
        out.append(row)
    return out


def test_mixed_hard_negatives_equal_the_direct_computation():
    got = mixed_hard_negatives(Q, T, 0, 2)
    assert torch.allclose(got, torch.tensor(_mixed_direct(2), dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("scaled", [False, True])
def test_composed_contrastive_with_mixed_negatives_scaled_and_unscaled(scaled):
    s, k = 1 / 0.01, 2
    neg = _mixed_direct(k)
    direct = 0
    for i in range(4):
        direct += _ce([s * float(T[i] @ Q[j]) for j in range(4)], i) / 8                     # L_i2t
        row = [s * float(Q[i] @ T[j]) for j in range(4)] + [(s if scaled else 1) * v for v in neg[i]]
        direct += _ce(row, i) / 8                                                             # L_t2i
    got = composed_contrastive(Q, T, s, k, scale_negatives=scaled).item()
    assert abs(got - direct) < 1e-9
    off = composed_contrastive(Q, T, s, 0).item()
    assert abs(off - contrastive(T, Q, s).item()) < 1e-12           # k = 0: the symmetric InfoNCE
    # Unscaled (as released) the appended logits carry almost no weight beside logits scaled by 100.
    assert abs(got - off) > 1e-3 if scaled else abs(got - off) < 1e-6
