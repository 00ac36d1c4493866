"""Tuning modes on the tiny ViT: trainable parameters against hand counts, start equal to the base,
a falling loss with gradient checkpointing, and the trained-state round trip. LIFT's counts on
ViT-B/16 and the adapters' placement: test_tuning_lift.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ltclip.core.errors import LtclipError
from ltclip.models.backbone import load_backbone
from ltclip.models.tuning import (
    TUNING,
    apply_tuning,
    count_trainable,
    load_trainable_state,
    no_weight_decay_names,
    trainable_state,
)

from conftest import TINY_MODEL

# ltclip-tiny-vit: width W, L blocks, patch p on 32 px (N patches + CLS), embed dim D; MLP hidden H
W, L, P, N, D = 64, 2, 8, (32 // 8) ** 2, 32
BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
         "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
         "mlp.c_proj.weight", "mlp.c_proj.bias"]
STEM = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]


@pytest.fixture(scope="module")
def base():
    return load_backbone(TINY_MODEL, "none")


@pytest.fixture(scope="module")
def H(base):
    return base.model.visual.transformer.resblocks[0].mlp.c_fc.out_features  # 4·W


NUM_CLASSES = 40  # bottleneck=auto / rank=auto on the tiny ViT: 2 ** int(log2(40 / (2·L))) = 2 ** 3
R = 8


def fresh(base, name=None, seed=0, **options):
    """A copy of the frozen base backbone with mode ``name`` applied (new parameters from ``seed``)."""
    bb = dataclasses.replace(base, model=copy.deepcopy(base.model))
    if name is not None:
        torch.manual_seed(seed)
        apply_tuning(bb.model, name, options, num_classes=NUM_CLASSES)
    return bb


def block(i, *suffixes):
    return {f"visual.transformer.resblocks.{i}.{s}" for s in suffixes}


def blocks(*suffixes):
    return set().union(*(block(i, *suffixes) for i in range(L)))


def visual(*names):
    return {f"visual.{n}" for n in names}


def block_count(H):
    """One block: ln_1, in_proj (3W×W + 3W), out_proj (W×W + W), ln_2, c_fc (H×W + H), c_proj (W×H + W)."""
    return 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (H * W + H) + (W * H + W)


def lora_factors(*in_out, r):
    """A [r, in] and B [out, r] per targeted weight."""
    return sum(r * i + o * r for i, o in in_out)


def bottleneck(b):
    """One adapter: its LayerNorm (2W), down W→b and up b→W with biases."""
    return 2 * W + (W * b + b) + (b * W + W)


STEM_COUNT = 3 * P * P * W + W + (N + 1) * W + 2 * W  # conv1 (no bias), CLS, positions, ln_pre
ADAPTER = [f"{m}.{f}" for m in ("norm", "down", "up") for f in ("weight", "bias")]
IN_PROJ_AB = [f"attn.parametrizations.in_proj_weight.0.{f}" for f in "AB"]
# (mode, options, trainable count, trainable names) — H is the MLP hidden width. What trains lies in the
# blocks (LIFT); widths are R = 8 at NUM_CLASSES unless given.
CASES = {
    "frozen": ("frozen", {}, lambda H: 0, lambda H: set()),
    "full": ("full", {}, lambda H: L * block_count(H), lambda H: blocks(*BLOCK)),
    "full-tower": ("full", {"tower": True}, lambda H: STEM_COUNT + L * block_count(H) + 2 * W + W * D,
                   lambda H: visual(*STEM, "ln_post.weight", "ln_post.bias", "proj") | blocks(*BLOCK)),
    "last-1": ("last-k", {"k": 1}, lambda H: block_count(H), lambda H: block(1, *BLOCK)),
    "last-2": ("last-k", {"k": 2}, lambda H: 2 * block_count(H), lambda H: blocks(*BLOCK)),
    # biases per block: ln_1, in_proj (3W), out_proj, ln_2, c_fc (H), c_proj
    "bitfit": ("bitfit", {}, lambda H: L * (W + 3 * W + W + W + H + W),
               lambda H: blocks(*[s for s in BLOCK if s.endswith("bias")])),
    # LayerNorms: ln_1 and ln_2 per block, each weight + bias
    "ln": ("ln", {}, lambda H: L * 2 * 2 * W, lambda H: blocks("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")),
    # q and v, rank R: L · 2 · (R·W + W·R)
    "lora": ("lora", {}, lambda H: L * lora_factors((W, W), (W, W), r=R), lambda H: blocks(*IN_PROJ_AB)),
    "lora-qkvo": ("lora", {"rank": 4, "targets": "q,k,v,out", "alpha": 16.0}, lambda H: L * lora_factors(*[(W, W)] * 4, r=4),
                  lambda H: blocks(*IN_PROJ_AB, *[f"attn.out_proj.parametrizations.weight.0.{f}" for f in "AB"])),
    "lora-mlp": ("lora", {"rank": 2, "targets": "fc,proj"}, lambda H: L * lora_factors((W, H), (H, W), r=2),
                 lambda H: blocks(*[f"mlp.{m}.parametrizations.weight.0.{f}" for m in ("c_fc", "c_proj") for f in "AB"])),
    "lora-last": ("lora", {"blocks": 1}, lambda H: lora_factors((W, W), (W, W), r=R), lambda H: block(1, *IN_PROJ_AB)),
    "adapter": ("adapter", {}, lambda H: L * bottleneck(R), lambda H: blocks(*[f"mlp.adapter.{n}" for n in ADAPTER])),
    "adapter-16": ("adapter", {"bottleneck": 16}, lambda H: L * bottleneck(16),
                   lambda H: blocks(*[f"mlp.adapter.{n}" for n in ADAPTER])),
    # plus the learned scale
    "adaptformer": ("adaptformer", {}, lambda H: L * (bottleneck(R) + 1),
                    lambda H: blocks(*[f"adaptformer.{n}" for n in ADAPTER], "adaptformer.scale")),
    "adaptformer-fixed": ("adaptformer", {"scale": 0.5, "learn_scale": False, "blocks": 1}, lambda H: bottleneck(R),
                          lambda H: block(1, *[f"adaptformer.{n}" for n in ADAPTER])),
    "vpt-shallow": ("vpt-shallow", {"tokens": 5}, lambda H: 5 * W, lambda H: block(0, "vpt.prompt")),
    "vpt-deep": ("vpt-deep", {}, lambda H: L * 10 * W, lambda H: blocks("vpt.prompt")),
    "vpt-deep-last": ("vpt-deep", {"blocks": 1}, lambda H: 10 * W, lambda H: block(1, "vpt.prompt")),
}
PROMPTS = {"vpt-shallow": 5, "vpt-deep": 10}  # prompt tokens of the cases above


def images(n=8, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_every_mode_has_a_case_and_a_summary():
    assert {mode for mode, *_ in CASES.values()} == set(TUNING.names())
    for name in TUNING.names():
        assert TUNING.summary(name), name


@pytest.mark.parametrize("case", CASES)
def test_trainable_parameters_match_the_hand_count(base, H, case):
    name, options, count, names = CASES[case]
    model = fresh(base, name, **options).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names(H)
    assert count_trainable(model) == count(H)
    assert set(trainable_state(model)) == trainable  # the inserted modules hold no buffers
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))


@pytest.mark.parametrize("case", CASES)
def test_tuned_model_starts_as_the_base(base, case):
    name, options, *_ = CASES[case]
    x = images()
    with torch.no_grad():
        ref = base.model.encode_image(x)
        bb = fresh(base, name, **options)
        out = bb.model.encode_image(x)
        embeds, tokens = bb.encode(x, tokens=True)
    torch.testing.assert_close(embeds, out)
    if name in PROMPTS:  # the prompts change the output; the sequence has 1 + T + N tokens
        assert tokens.shape == (len(x), 1 + PROMPTS[name] + N, W)
        assert not torch.allclose(out, ref)
    else:  # B / up start at zero (tolerance: MHA's fast path is off once something trains)
        assert tokens.shape == (len(x), 1 + N, W)
        torch.testing.assert_close(out, ref)


def train_steps(bb, steps=6, checkpointing=True, seed=0):
    """SGD on a linear head over ``encode_image`` with only trainable parameters; the losses."""
    model = bb.model.train()
    model.set_grad_checkpointing(checkpointing)
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, 4)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    x, y = images(), torch.arange(8) % 4
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(head(model.encode_image(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("case", CASES)
def test_loss_falls_with_checkpointing_and_only_trainable_parameters_move(base, case):
    name, options, *_ = CASES[case]
    bb = fresh(base, name, **options)
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    losses = train_steps(bb)
    assert losses[-1] < losses[0]
    for n, p in bb.model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable ones moved, frozen ones did not


@pytest.mark.parametrize("case", ["full", "lora", "adapter", "adaptformer", "vpt-deep", "vpt-deep-last"])
def test_gradient_checkpointing_gives_the_same_gradients(base, case):
    name, options, *_ = CASES[case]
    grads = []
    for checkpointing in (False, True):
        bb = fresh(base, name, **options)
        bb.model.train().set_grad_checkpointing(checkpointing)
        bb.model.encode_image(images()).square().sum().backward()
        grads.append({n: p.grad for n, p in bb.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize("case", CASES)
def test_trained_state_round_trips(base, case):
    name, options, *_ = CASES[case]
    trained = fresh(base, name, **options)
    train_steps(trained, steps=2, checkpointing=False)
    state = trainable_state(trained.model)
    restored = fresh(base, name, seed=1, **options)  # other initial values: the load must overwrite them
    load_trainable_state(restored.model, state)
    x = images(4, seed=5)
    with torch.no_grad():
        for a, b in zip(trained.encode(x, tokens=True), restored.encode(x, tokens=True)):
            assert torch.equal(a, b)
        assert torch.equal(trained.model.encode_image(x), restored.model.encode_image(x))


def test_trained_state_refuses_missing_unexpected_and_misshapen_entries(base):
    state = trainable_state(fresh(base, "lora").model)
    key = "visual.transformer.resblocks.0.attn.parametrizations.in_proj_weight.0.A"
    bad = {
        "missing entry": {k: v for k, v in state.items() if k != key},
        "unexpected entry": {**state, "visual.proj": torch.zeros(W, D)},
        "has shape": {**state, key: state[key][:, :4]},
    }
    for what, broken in bad.items():
        with pytest.raises(LtclipError, match=what) as err:
            load_trainable_state(fresh(base, "lora").model, broken)
        assert "\n" not in str(err.value)
    with pytest.raises(LtclipError, match="unexpected entry visual.proj"):
        load_trainable_state(fresh(base, "lora", rank=4, targets="q,k,v").model, {**state, "visual.proj": 0})


@pytest.mark.parametrize("name, options, key", [
    ("lora", {"rnak": 4}, "rnak"),
    ("frozen", {"k": 1}, "k"),
    ("last-k", {"k": 0}, "k=0"),
    ("last-k", {"k": 3}, "k=3"),
    ("lora", {"targets": "q,w"}, "targets='q,w'"),
    ("lora", {"rank": 0}, "rank=0"),
    ("lora", {"rank": "big"}, "rank='big'"),
    ("lora", {"blocks": 3}, "blocks=3"),
    ("adapter", {"bottleneck": 0}, "bottleneck=0"),
    ("adaptformer", {"bottleneck": "2.5"}, "bottleneck='2.5'"),
    ("adaptformer", {"blocks": "0"}, "blocks='0'"),
    ("vpt-deep", {"tokens": 0}, "tokens=0"),
    ("vpt-deep", {"blocks": "last"}, "blocks='last'"),
])
def test_bad_options_are_one_line_tune_opt_errors(base, name, options, key):
    with pytest.raises(LtclipError, match="--tune-opt") as err:
        fresh(base, name, **options)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_options_parse_from_the_cli():
    assert TUNING.parse("lora", ["rank=4", "targets=q,v", "blocks=6"]) == {"rank": 4, "targets": "q,v", "blocks": 6}  # typed once
    assert TUNING.options("adaptformer") == {"bottleneck": "auto", "scale": 1.0, "learn_scale": True, "blocks": "all", "down_init": "normal"}
    assert TUNING.parse("adaptformer", ["scale=0.1", "learn_scale=false"]) == {"scale": 0.1, "learn_scale": False}
    for bad in ("tokens=3", "num_classes=5"):  # the class count is the stage's, never an option
        with pytest.raises(LtclipError, match=f"--tune-opt '{bad[:-2]}' is not an option"):
            TUNING.parse("lora", [bad])


def test_widths_parsed_from_the_cli_equal_integer_ones(base):
    parsed = TUNING.parse("adapter", ["bottleneck=16", "blocks=1"])
    assert count_trainable(fresh(base, "adapter", **parsed).model) == bottleneck(16)
    assert count_trainable(fresh(base, "adapter", bottleneck=16, blocks=1).model) == bottleneck(16)


def test_auto_width_needs_the_class_count(base):
    with pytest.raises(LtclipError, match="--tune-opt rank='auto': needs the class count"):
        apply_tuning(copy.deepcopy(base.model), "lora", {})
    apply_tuning(model := copy.deepcopy(base.model), "lora", {"rank": 2})  # an integer width needs none
    assert count_trainable(model) == L * lora_factors((W, W), (W, W), r=2)


def test_no_weight_decay_names(base):
    """Prompts and adapters decay like LIFT's tuner; only the tower's own embeddings are exempt, when trained."""
    assert no_weight_decay_names(fresh(base, "vpt-deep").model) == set()
    assert no_weight_decay_names(fresh(base, "full", tower=True).model) == visual("class_embedding", "positional_embedding")
    assert no_weight_decay_names(fresh(base, "full").model) == set()
    assert no_weight_decay_names(fresh(base, "lora").model) == set()


def test_modes_that_insert_modules_need_an_open_clip_vit():
    class NotViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(2, 2)

    with pytest.raises(LtclipError, match="needs an open_clip ViT"):
        apply_tuning(NotViT(), "lora", {"rank": 2})
    with pytest.raises(LtclipError, match="needs an open_clip ViT"):
        apply_tuning(NotViT(), "bitfit", {})
    model = NotViT()
    apply_tuning(model, "full", {"tower": True})
    assert count_trainable(model) == 6
