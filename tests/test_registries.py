"""Contracts every registered entry meets, parametrized over each registry's ``list_*()``: a new
loss, head, sampler or two-stage method is tested by being registered. Plus the Registry API."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltclip.data.samplers import SAMPLERS, class_probabilities, create_sampler, list_samplers
from ltclip.core.errors import LtclipError
from ltclip.methods.losses import LOSSES, compute_loss, list_losses, softmax_offset
from ltclip.models.heads import HEADS, HeadInputs, create_head, head_needs, list_heads, rebuild_head, training_defaults
from ltclip.core.registry import Registry, keyword_defaults
from ltclip.methods.second_stage import TWO_STAGE, fit_two_stage

REGISTRIES = {"loss": LOSSES, "head": HEADS, "sampler": SAMPLERS, "two-stage": TWO_STAGE}
ENTRIES = (
    [("loss", n) for n in list_losses()]
    + [("head", n) for n in list_heads()]
    + [("sampler", n) for n in list_samplers()]
    + [("two-stage", n) for n in TWO_STAGE.names()]
)
IDS = [f"{kind}:{name}" for kind, name in ENTRIES]

# tiny inputs
C, D, T, W = 5, 8, 3, 8
TEXT = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(1)), dim=-1)
COUNTS = [40.0, 12.0, 5.0, 2.0, 1.0]
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 3, 4, 0, 1, 2])


def as_text(value) -> str:
    """A default written as a user writes it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def label(registry: Registry) -> str:
    """What option errors are prefixed with: the CLI flag, or "<kind> option" without one."""
    return registry.flag or f"{registry.kind} option"


def tiny_text_encoder():
    """A 1-layer, 16-wide open_clip text tower with ``D``-d features and ``C`` class names, for the heads
    that need one (``needs.text_encoder``)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from ltclip.models.text_prompts import TextEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.CLIP(D, open_clip.CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=16),
                               open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=2, layers=1))
    return TextEncoder(model.eval(), SimpleTokenizer(context_length=16), [f"class {i}" for i in range(C)])


TEXT_ENCODER = tiny_text_encoder()


def tower(name):
    """The ``text_encoder`` argument head ``name`` takes: the tiny tower, or None for heads that need none."""
    return TEXT_ENCODER if head_needs(name).text_encoder else None


def build_head(name, seed=0, **params):
    """Head ``name`` built through the factory from a context holding everything any head needs."""
    torch.manual_seed(seed)
    return create_head(name, HeadInputs(C, D, (T, W), TEXT, tower(name)), **params).eval()


def head_inputs(head, n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, W, generator=g) if head.input == "tokens" else torch.randn(n, D, generator=g)


def random_logits(seed=0, n=6, scale=2.0):
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * scale


def gap_logits(gap: float):
    """Every sample's target logit ``gap`` above the others (and one sample far below)."""
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = torch.zeros(len(targets), C)
    logits[torch.arange(len(targets)), targets] = gap
    logits[-1, 0] = -gap  # a confidently wrong sample too
    return logits, targets


# ---------------------------------------------------------------- every entry, every registry


def test_every_registry_has_entries():
    for kind, registry in REGISTRIES.items():
        assert registry.names(), kind


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
def test_entry_has_a_docstring_summary_and_its_name(kind, name):
    registry = REGISTRIES[kind]
    summary = registry.summary(name)
    assert summary and "\n" not in summary
    assert registry.get(name).name == name
    assert name in registry


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
def test_option_defaults_round_trip_through_parse(kind, name):
    registry = REGISTRIES[kind]
    defaults = registry.options(name)
    parsed = registry.parse(name, [f"{key}={as_text(value)}" for key, value in defaults.items()])
    assert parsed == defaults
    assert {k: type(v) for k, v in parsed.items()} == {k: type(v) for k, v in defaults.items()}
    assert all(v is not inspect.Parameter.empty for v in defaults.values()), "every option needs a default"
    json.dumps(defaults)  # options are plain values (a run records them)


@pytest.mark.parametrize("kind, name", ENTRIES, ids=IDS)
def test_unknown_option_is_a_one_line_error_naming_the_flag(kind, name):
    registry = REGISTRIES[kind]
    for call in (lambda: registry.parse(name, ["bogus_opt=1"]), lambda: registry.check(name, {"bogus_opt": 1})):
        with pytest.raises(LtclipError, match="bogus_opt") as err:
            call()
        message = str(err.value)
        assert "\n" not in message and label(registry) in message and "valid keys" in message
    factory = {
        "loss": lambda: compute_loss(name, random_logits(), torch.zeros(6, dtype=torch.long), COUNTS, bogus_opt=1),
        "head": lambda: build_head(name, bogus_opt=1),
        "sampler": lambda: create_sampler(name, LABELS, C, bogus_opt=1),
        "two-stage": lambda: fit_two_stage(
            name, classifier=torch.nn.Linear(D, C), z_train=np.zeros((len(LABELS), D), np.float32), y_train=LABELS,
            class_counts=np.bincount(LABELS, minlength=C), bogus_opt=1,
        ),
    }[kind]
    with pytest.raises(LtclipError, match=f"^{label(registry)} bogus_opt: not an option of") as err:
        factory()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- losses


# Besides its defaults, each loss with the options that take other code paths (a fractional
# exponent is where pow(0, γ < 1) differentiates to inf).
STRESSED = {
    "focal": [{"gamma": 0.5}, {"gamma": 0.0}],
    "cb": [{"base": "focal", "gamma": 0.5}, {"base": "focal", "gamma": 0.0}],
    "ldam": [{"drw_epoch": 0}],
    "ce": [{"label_smoothing": 0.1}],
    "grw": [{"exponent": 0.5, "label_smoothing": 0.1}],
    "lade": [{"alpha": 1.0}],
}
LOSS_CASES = [(name, {}) for name in list_losses()] + [
    (name, opts) for name in list_losses() for opts in STRESSED.get(name, [])
]
LOSS_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in LOSS_CASES]


@pytest.mark.parametrize("name, opts", LOSS_CASES, ids=LOSS_IDS)
def test_loss_is_a_finite_scalar_with_finite_gradients_on_random_logits(name, opts):
    logits = random_logits(seed=3, scale=4.0).requires_grad_(True)
    targets = torch.tensor([0, 1, 1, 4, 0, 2])
    value = compute_loss(name, logits, targets, COUNTS, **opts)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_stressed_options_are_options():
    for name, opts in LOSS_CASES:
        LOSSES.check(name, opts)


@pytest.mark.parametrize("gap", [17.0, 30.0, 100.0])
@pytest.mark.parametrize("name, opts", LOSS_CASES, ids=LOSS_IDS)
def test_loss_gradient_finite_with_a_large_logit_gap(name, opts, gap):
    """p_y rounds to 1 in float32 from a gap of about 17; nothing may turn into 0 · inf."""
    logits, targets = gap_logits(gap)
    logits.requires_grad_(True)
    value = compute_loss(name, logits, targets, COUNTS, **opts)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def option_variants(defaults: dict) -> list[dict]:
    """No options (the defaults), then each option alone off its default: floats 0, 0.3 and 1.7, ints 0
    and 2, booleans flipped (strings keep theirs)."""
    variants = [{}]
    for key, value in defaults.items():
        others = [not value] if isinstance(value, bool) else [0, 2] if isinstance(value, int) else \
            [0.0, 0.3, 1.7] if isinstance(value, float) else []
        variants += [{key: v} for v in others if v != value]
    return variants


@pytest.mark.parametrize("name", list_losses())
def test_declared_softmax_offset_makes_the_loss_a_cross_entropy_of_offset_logits(name):
    """Where a loss declares offsets ``o`` (what lets a sweep batch it), it equals ``F.cross_entropy(z + o)``
    computed here, in float64, at every epoch; a zero count is clamped alike by both."""
    declared = LOSSES.meta(name, "softmax_offset")
    counts = torch.tensor([40.0, 12.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    if declared is None:
        assert softmax_offset(name, counts) is None
        return
    assert keyword_defaults(declared) == LOSSES.options(name)  # the loss's options, same names and defaults
    of_the_form = 0
    for params in option_variants(LOSSES.options(name)):
        offset = softmax_offset(name, counts, **params)
        if offset is None:
            continue
        of_the_form += 1
        assert offset.dtype == torch.float64 and offset.shape == (C,)
        for seed, epoch in ((0, 0), (1, 1), (2, 3)):
            logits = random_logits(seed, n=9, scale=4.0).double()
            targets = torch.randint(0, C, (9,), generator=torch.Generator().manual_seed(seed))
            value = compute_loss(name, logits, targets, counts, epoch=epoch, total_epochs=4, **params)
            torch.testing.assert_close(value, F.cross_entropy(logits + offset, targets), rtol=1e-12, atol=0)
    assert of_the_form, f"{name} declares an offset but none of its option variants has one"


def test_softmax_offset_is_none_where_options_leave_the_form():
    assert softmax_offset("ce", COUNTS, label_smoothing=0.1) is None
    assert torch.equal(softmax_offset("ce", COUNTS), torch.zeros(C, dtype=torch.float64))
    with pytest.raises(LtclipError, match="--loss-opt tau: not an option of loss 'ce'"):
        softmax_offset("ce", COUNTS, tau=1.0)


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("name", list_heads())
def test_head_with_defaults_gives_finite_logits_and_records_its_config(name):
    head = build_head(name)
    x = head_inputs(head)
    logits = head(x)
    assert logits.shape == (len(x), C) and torch.isfinite(logits).all()
    assert head.config == {"num_classes": C, "embed_dim": D, "token_shape": [T, W], **HEADS.options(name)}


@pytest.mark.parametrize("name", list_heads())
def test_head_rebuilt_from_its_config_gives_identical_logits(name):
    head = build_head(name)
    with torch.no_grad():  # move away from the initial weights so the rebuild must load them
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = json.loads(json.dumps(head.config))
    assert "text_embeds" not in config
    torch.manual_seed(99)
    rebuilt = rebuild_head(name, config, tower(name))
    rebuilt.load_state_dict(head.state_dict())
    rebuilt.eval()
    x = head_inputs(head)
    assert torch.equal(rebuilt(x), head(x))


@pytest.mark.parametrize(
    "name, params", [("decoder", {"depth": 1, "heads": 2, "qkv_bias": False}), ("mlp", {"hidden": 5}),
                     ("cosine", {"learn_scale": False, "init_scale": 4.0}), ("linear", {"normalize": False}),
                     ("prompt", {"init": "", "context": 3, "class_specific": True, "classes_per_step": 2, "chunk": 2})],
)
def test_head_config_records_given_options_and_rebuilds_them(name, params):
    head = build_head(name, **params)
    assert head.config == {"num_classes": C, "embed_dim": D, "token_shape": [T, W], **HEADS.options(name), **params}
    rebuilt = rebuild_head(name, json.loads(json.dumps(head.config)), tower(name))
    rebuilt.load_state_dict(head.state_dict())
    x = head_inputs(head)
    assert torch.equal(rebuilt.eval()(x), head(x))


@pytest.mark.parametrize("name", list_heads())
def test_factory_refuses_a_context_without_what_the_head_declares_and_needs_nothing_else(name):
    """With its text options on, the head is built from a context holding only what its ``needs``
    declare; each of those missing is a one-line LtclipError naming the head."""
    declared = HEADS.get(name).needs.text_embeds
    on = {declared: True} if isinstance(declared, str) else {}
    needs = head_needs(name, on)
    full = {"token_shape": (T, W), "text_embeds": TEXT, "text_encoder": TEXT_ENCODER}
    needed = {"token_shape": needs.input == "tokens", "text_embeds": needs.text_embeds, "text_encoder": needs.text_encoder}
    head = create_head(name, HeadInputs(C, D, **{k: v if needed[k] else None for k, v in full.items()}), **on)
    assert torch.isfinite(head.eval()(head_inputs(head))).all()
    for key in (k for k, wanted in needed.items() if wanted):
        with pytest.raises(LtclipError, match=f"^--head {name} [^\n]+$"):
            create_head(name, HeadInputs(C, D, **{**full, key: None}), **on)


@pytest.mark.parametrize("name", list_heads())
def test_head_training_defaults_are_for_registered_losses(name):
    defaults = training_defaults(name)
    assert set(defaults.loss_options) <= set(list_losses())
    assert not defaults.min_steps or "epochs" in defaults.options  # min_steps lengthens the default epochs


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", list_samplers())
def test_sampler_with_defaults_draws_valid_indices(name):
    assert SAMPLERS.options(name) == {}
    sampler = create_sampler(name, LABELS, C, num_samples=40, seed=1, total_epochs=2)
    sampler.set_epoch(1)
    order = list(sampler)
    assert len(order) == len(sampler) == 40
    assert all(0 <= i < len(LABELS) for i in order)
    p = class_probabilities(name, np.bincount(LABELS, minlength=C), epoch=1, total_epochs=2)
    assert p.shape == (C,) and np.isfinite(p).all() and p.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- the Registry API itself


def make_registry():
    reg = Registry("widget", flag="--widget-opt", exclude=("seed",))

    @reg.register("plain")
    def plain(x, *, seed=0, size: int = 3, ratio: float = 0.5, on: bool = True, mode: str = "a", grid=(1.0, 2.0)):
        """A plain widget.

        More text.
        """
        return x, size, ratio, on, mode, grid

    @reg.register("box")
    class Box:
        """Box widget."""

        def __init__(self, x, *, seed=0, depth: int = 2):
            self.x, self.depth = x, depth

    @reg.register("bare")
    class Bare(Box):
        pass

    return reg


def test_registry_entries_names_and_lookup():
    reg = make_registry()
    assert reg.names() == ["bare", "box", "plain"] and reg.names("b*") == ["bare", "box"]
    assert "box" in reg and "crate" not in reg
    assert reg.get("box").name == "box" and reg.get("plain").name == "plain" and reg.get("bare").name == "bare"
    with pytest.raises(LtclipError, match=r"^unknown widget 'bx' \(did you mean box\?\); choose one of: bare, box, plain$"):
        reg.get("bx")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("box")(object)


def test_registry_summary_is_the_entrys_own_first_line():
    reg = make_registry()
    assert reg.summary("plain") == "A plain widget."
    assert reg.summary("box") == "Box widget."
    assert reg.summary("bare") == ""  # not inherited from Box: the contract test catches a missing docstring


def test_registry_options_parse_check_create():
    reg = make_registry()
    assert reg.options("plain") == {"size": 3, "ratio": 0.5, "on": True, "mode": "a", "grid": (1.0, 2.0)}
    assert reg.options("bare") == {"depth": 2}  # a class's options: its __init__'s keyword-only parameters
    assert reg.parse("plain", ["size=4", "on=no", "grid=0, 3", " mode = b"]) == {
        "size": 4, "on": False, "grid": (0.0, 3.0), "mode": "b",
    }
    for opts, message in (
        (["seed=1"], r"^--widget-opt 'seed' is not an option of widget 'plain'; valid keys: size, ratio, on, mode, grid$"),
        (["size"], "must look like key=value"),
        (["size=1.5"], r"size='1.5': expected int \(default 3\)"),
    ):
        with pytest.raises(LtclipError, match=message):
            reg.parse("plain", opts)
    reg.check("plain", {"size": 1, "seed": 3})  # excluded names are valid keywords, not options
    with pytest.raises(LtclipError, match=r"^--widget-opt colour, shape: not options of widget 'box'; valid keys: depth$"):
        reg.check("box", {"colour": 1, "shape": 2})
    assert reg.create("plain", 7, size=9) == (7, 9, 0.5, True, "a", (1.0, 2.0))
    assert reg.create("box", 1, seed=4, depth=5).depth == 5
    with pytest.raises(LtclipError, match="^--widget-opt width: not an option of widget 'box'"):
        reg.create("box", 1, width=3)


def test_registry_signature_and_default_label():
    class Method:
        """A method fitted by a classmethod."""

        def __init__(self, *, in_dim: int):
            self.in_dim = in_dim

        @classmethod
        def fit(cls, data, *, steps: int = 10):
            return cls(in_dim=len(data))

    reg = Registry("method", signature=lambda cls: cls.fit)
    reg.register("m")(Method)
    assert reg.options("m") == {"steps": 10}
    with pytest.raises(LtclipError, match="^method option speed: not an option of method 'm'; valid keys: steps$"):
        reg.check("m", {"speed": 1})


def test_registry_meta_is_what_an_entry_was_registered_with_and_never_inherited():
    reg = Registry("widget")

    @reg.register("box", colour="red")
    class Box:
        """Box widget."""

    reg.register("crate")(type("Crate", (Box,), {}))
    assert reg.meta("box", "colour") == "red" and reg.meta("box", "size") is None and reg.meta("box", "size", 3) == 3
    assert reg.meta("crate", "colour") is None  # a subclass of Box, registered without it
    assert not hasattr(Box, "colour")
    with pytest.raises(LtclipError, match="unknown widget 'bx'"):
        reg.meta("bx", "colour")
