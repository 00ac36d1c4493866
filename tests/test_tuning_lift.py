"""The tuning modes as LIFT defines them, on open_clip ViT-B/16 (random weights): trainable counts
against hand computations and LIFT's published ones, the width rule, and the adapters' and LoRA's
placement and initialisation (github.com/shijxcs/LIFT, models/peft_modules.py and peft_vit.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ltclip.models.tuning import TUNING, count_trainable, trainable_counts
from ltclip.models.tuning.core import lift_width, tune_visual

W, L, H, PATCH = 768, 12, 3072, 16  # ViT-B/16: width, blocks, MLP hidden width, patch size
TOKENS = 1 + (224 // PATCH) ** 2


@pytest.fixture(scope="module")
def vit():
    """ViT-B/16's image tower, frozen (built once: a few seconds)."""
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None).visual.requires_grad_(False)


def tuned(visual, mode, num_classes=1000, seed=0, **options):
    visual = copy.deepcopy(visual)
    torch.manual_seed(seed)
    tune_visual(visual, mode, options, num_classes)
    return visual


@pytest.mark.parametrize("num_classes, width", [
    (10, 1), (23, 1), (24, 1), (47, 1), (48, 2), (100, 4), (365, 8), (1000, 32), (8142, 256), (10_000, 256), (12_288, 512),
])
def test_lift_width_rule(num_classes, width):
    """2 ** max(0, int(log2(C / 24))) on 12 blocks: 10/24 < 1 gives 2 ** 0; 100/24 = 4.2 → 4; 1000/24 = 41.7 → 32;
    365/24 = 15.2 → 8; 8142/24 = 339 → 256; 10000/24 = 417 → 256; 12288/24 = 512 exactly → 512."""
    assert lift_width(num_classes, L) == width


def block_params():
    """One block: ln_1, in_proj (3W·W + 3W), out_proj (W·W + W), ln_2, c_fc (H·W + H), c_proj (W·H + W)."""
    return 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (H * W + H) + (W * H + W)


def adapter_params(r):
    """One adapter: its LayerNorm 2W, down W·r + r, up r·W + W."""
    return 2 * W + (W * r + r) + (r * W + W)


def hand_counts(num_classes):
    r = lift_width(num_classes, L)
    return {
        "frozen": 0,
        "full": L * block_params(),
        "last-k": block_params(),  # k = 1: the last block
        "bitfit": L * (W + 3 * W + W + W + H + W),  # ln_1, in_proj, out_proj, ln_2, c_fc, c_proj biases
        "ln": L * 2 * 2 * W,
        "adapter": L * adapter_params(r),
        "adaptformer": L * (adapter_params(r) + 1),  # + the learned scale
        "lora": L * 2 * (r * W + W * r),  # A [r, W] and B [W, r] for q and v
        "vpt-shallow": 10 * W,
        "vpt-deep": L * 10 * W,
    }


# LIFT's own counts (its ``Tuned params`` line, trainer.py build_optimizer) on CLIP ViT-B/16, ImageNet-LT
LIFT_COUNTS_1000 = {"full": 85_054_464, "bitfit": 101_376, "ln": 36_864, "adapter": 617_856,
                    "adaptformer": 617_868, "lora": 1_179_648}
# the same modes at 365 (Places-LT, r = 8) and 8,142 classes (iNat18, r = 256), from hand_counts
MEASURED = {
    365: {"adapter": 175_200, "adaptformer": 175_212, "lora": 294_912},
    8142: {"adapter": 4_749_312, "adaptformer": 4_749_324, "lora": 9_437_184},
}


@pytest.mark.slow  # about 1.6-2.2 s on 2 cores
@pytest.mark.parametrize("num_classes", [1000, 365, 8142])
def test_trainable_counts_of_every_mode(vit, num_classes):
    counts = {mode: count_trainable(tuned(vit, mode, num_classes)) for mode in TUNING.names()}
    assert counts == hand_counts(num_classes)
    expected = LIFT_COUNTS_1000 if num_classes == 1000 else MEASURED[num_classes]
    assert {mode: counts[mode] for mode in expected} == expected


def test_list_tuning_counts_at_1000_classes():
    assert trainable_counts("ViT-B-16", ["adaptformer", "full"]) == {"adaptformer": 617_868, "full": 85_054_464}


def test_blocks_option_counts_the_last_k_blocks(vit):
    r = 32
    assert count_trainable(tuned(vit, "adaptformer", blocks=4)) == 4 * (adapter_params(r) + 1)
    assert count_trainable(tuned(vit, "lora", blocks=2)) == 2 * 2 * 2 * r * W
    assert count_trainable(tuned(vit, "vpt-deep", blocks=3)) == 3 * 10 * W
    assert count_trainable(tuned(vit, "last-k", k=3)) == 3 * block_params()
    assert count_trainable(tuned(vit, "adapter", bottleneck=64)) == L * adapter_params(64)


def mid_stream(block, x):
    """The residual stream between the block's attention and MLP sub-layers."""
    return x + block.attention(q_x=block.ln_1(x))


def test_adaptformer_starts_as_the_block_and_reads_the_residual_stream(vit):
    visual = tuned(vit, "adaptformer")
    block, base = visual.transformer.resblocks[0], vit.transformer.resblocks[0]
    branch = block.adaptformer
    assert torch.equal(branch.scale, torch.ones(1)) and branch.scale.requires_grad
    assert torch.equal(branch.norm.weight, torch.ones(W)) and torch.equal(branch.norm.bias, torch.zeros(W))
    assert not branch.up.weight.any() and not branch.up.bias.any() and not branch.down.bias.any()
    x = torch.randn(2, TOKENS, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(block(x), base(x))  # the branch adds an exact zero
        torch.nn.init.normal_(branch.up.weight, std=0.02)
        mid = mid_stream(base, x)
        by_hand = mid + base.mlp(base.ln_2(mid)) + branch.up(torch.relu(branch.down(torch.layer_norm(mid, (W,)))))
        torch.testing.assert_close(block(x), by_hand, rtol=1e-5, atol=1e-5)


def test_adaptformer_scale_learns_once_up_has_moved(vit):
    """d out / d scale is the unscaled branch, zero while up = 0; up's own gradient is not, so after one
    SGD step on it the scale's gradient is non-zero and equals <g, branch(x)>."""
    block = copy.deepcopy(tuned(vit, "adaptformer").transformer.resblocks[0])
    branch = block.adaptformer
    x = torch.randn(2, TOKENS, W, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, TOKENS, W, generator=torch.Generator().manual_seed(2))
    (block(x) * g).sum().backward()
    assert branch.scale.grad.abs().item() == 0 and branch.up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        branch.up.weight -= 0.1 * branch.up.weight.grad
    branch.zero_grad()
    (block(x) * g).sum().backward()
    with torch.no_grad():
        unscaled = branch(mid_stream(block, x)) / branch.scale
    assert branch.scale.grad.abs().item() > 0
    torch.testing.assert_close(branch.scale.grad, (g * unscaled).sum().reshape(1), rtol=1e-3, atol=1e-3)


def test_adapter_is_serial_on_the_mlp_output_with_its_own_norm(vit):
    visual = tuned(vit, "adapter")
    block, base = visual.transformer.resblocks[5], vit.transformer.resblocks[5]
    adapter = block.mlp.adapter
    std = math.sqrt(2 / (1 + 5)) / math.sqrt(W)  # Kaiming-normal, a = √5, fan-in W
    assert adapter.down.weight.std().item() == pytest.approx(std, rel=0.05)
    assert not adapter.up.weight.any() and not adapter.up.bias.any() and not adapter.down.bias.any()
    x = torch.randn(2, TOKENS, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(block(x), base(x))  # the branch adds an exact zero
        torch.nn.init.normal_(adapter.up.weight, std=0.02)
        mid = mid_stream(base, x)
        h = base.mlp(base.ln_2(mid))
        by_hand = mid + h + adapter.up(torch.relu(adapter.down(torch.layer_norm(h, (W,)))))
        torch.testing.assert_close(block(x), by_hand, rtol=1e-5, atol=1e-5)


def test_lora_updates_q_and_v_only_with_scaling_one_over_rank(vit):
    visual = tuned(vit, "lora")
    attn = visual.transformer.resblocks[0].attn
    delta = attn.parametrizations.in_proj_weight[0]
    r = 32
    assert delta.A.shape == (2, r, W) and delta.B.shape == (2, W, r) and not delta.B.any()
    assert delta.A.abs().max().item() <= 1 / math.sqrt(r)  # LIFT: Kaiming-uniform of its [W, r] factor
    assert delta.A.abs().max().item() > 0.9 / math.sqrt(r)
    with torch.no_grad():
        torch.nn.init.normal_(delta.B)
        change = attn.in_proj_weight - attn.parametrizations.in_proj_weight.original
    q, k, v = change.split(W)
    torch.testing.assert_close(q, delta.B[0] @ delta.A[0] / r)
    assert not k.any()
    torch.testing.assert_close(v, delta.B[1] @ delta.A[1] / r)


def test_adaptformer_down_projection_is_kaiming_normal_or_lift_plus_uniform():
    """LIFT: kaiming-normal (std gain/sqrt(fan_in), gain sqrt(2/(1+5))); LIFT+: kaiming-uniform, bound sqrt(3)·std."""
    from ltclip.models.tuning.adapters import Bottleneck

    torch.manual_seed(0)
    std = math.sqrt(2 / (1 + 5)) / math.sqrt(768)
    normal = Bottleneck(768, 512, "normal").down.weight
    uniform = Bottleneck(768, 512, "uniform").down.weight
    assert abs(normal.std().item() - std) < 0.02 * std and normal.abs().max() > math.sqrt(3) * std
    assert uniform.abs().max() <= math.sqrt(3) * std and abs(uniform.std().item() - std) < 0.02 * std
