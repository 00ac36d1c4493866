"""The head registry and the one head factory: :func:`create_head` builds a head by name from a
:class:`~.base.HeadInputs` context, checking it holds what the head's ``needs`` declare;
:func:`rebuild_head` rebuilds one from its ``config``. A head registers with its training defaults
as data, ``@HEADS.register(name, defaults=HeadDefaults(...))``: :func:`training_defaults`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...core.errors import LtclipError
from ...core.registry import Registry
from .base import Head, HeadInputs, HeadNeeds

HEADS: Registry[type[Head]] = Registry("head", flag="--head-opt")
SIZES = ("num_classes", "embed_dim", "token_shape", "pooled_dim")  # the keys of head.config that are not options


@dataclass(frozen=True)
class HeadDefaults:
    """A head's stage-1 training defaults (train-head options), over the config dataclass's and under
    --recipe and the options given; measured in docs/methods_benchmark.md ("Defaults that learn").
    ``loss_options[loss]`` replaces some of them for that loss; a run whose length comes from the
    default epochs trains at least ``min_steps`` optimizer steps."""

    options: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)
    min_steps: int = 0


def without_prior(lr: float) -> dict:
    """``loss_options`` giving ``lr`` to the losses without a class prior, CE and focal: under them
    the tail classes learn only as fast as the step lets them (focal shrinks easy rows' gradients
    further), so they take a larger step than the balanced losses (docs/methods_benchmark.md)."""
    return {loss: {"lr": lr} for loss in ("ce", "focal")}


list_heads = HEADS.names


def training_defaults(name: str) -> HeadDefaults:
    """The training defaults head ``name`` registered with (none: empty)."""
    return HEADS.meta(name, "defaults", HeadDefaults())


def head_needs(name: str, options: dict | None = None) -> HeadNeeds:
    """What head ``name`` built with ``options`` (parsed; defaults fill the rest) needs of its inputs."""
    return HEADS.get(name).needs_for({**HEADS.options(name), **(options or {})})


def create_head(name: str, inputs: HeadInputs, **options) -> Head:
    """Head ``name`` built from ``inputs`` with ``options`` (``HEADS.parse``d); one-line LtclipError
    when ``inputs`` lack what the head needs. ``head.config`` records the sizes and every option,
    defaults included (JSON-serialisable, no text embeddings): what :func:`rebuild_head` reads."""
    HEADS.check(name, options)
    options = {**HEADS.options(name), **options}
    needs = head_needs(name, options)
    head = HEADS.get(name)(_checked(name, needs, inputs), **options)
    head.input = needs.input
    head.config = {**inputs.sizes(needs.input), **options}
    return head


def rebuild_head(name: str, config: dict, text_encoder=None) -> Head:
    """The head whose ``head.config`` is ``config``, for ``load_state_dict``: what it starts from (text
    embeddings, training features) is zeros here (its state holds the trained weights); a head that
    runs the text tower takes ``text_encoder``."""
    sizes = {k: config.get(k) for k in SIZES}
    options = HEADS.get(name).saved_options({k: v for k, v in config.items() if k not in SIZES})
    needs = head_needs(name, options)
    c, d = sizes["num_classes"], HeadInputs(**sizes).vector_dim(needs.input)
    start = (torch.zeros(c, d), torch.arange(c)) if needs.train_features else None
    inputs = HeadInputs(**sizes, text_embeds=torch.zeros(c, d), text_encoder=text_encoder,
                        text_templates=needs.templates, train_features=start)
    return create_head(name, inputs, **options)


def _checked(name: str, needs: HeadNeeds, inputs: HeadInputs) -> HeadInputs:
    """``inputs`` holding what ``needs`` asks for (text embeddings as float32); LtclipError otherwise."""
    if needs.input == "tokens" and inputs.token_shape is None:
        raise LtclipError(f"--head {name} needs token sequences; re-extract with --tokens")
    if needs.input == "pooled" and inputs.pooled_dim is None:
        raise LtclipError(f"--head {name} input=pooled reads the ViT's feature before the projection, which this cache "
                          "lacks; re-extract with --pooled (or use input=embeds)")
    if needs.train_features and inputs.train_features is None:
        raise LtclipError(f"--head {name} starts from the training images' features, which only finetune computes "
                          "(one pass of the frozen encoder); choose another initialisation")
    if needs.text_encoder:
        _check_text_encoder(name, inputs)
    if needs.text_embeds:
        return dataclasses.replace(inputs, text_embeds=_checked_text(name, needs, inputs))
    return inputs


def _checked_text(name: str, needs: HeadNeeds, inputs: HeadInputs) -> Tensor:
    """The class text embeddings a head starts from, as float32 [C, D] (D the size of its input)."""
    if inputs.text_embeds is None:
        raise LtclipError(
            f"--head {name} starts from the class text embeddings (text.h5, written by extract beside the cache); "
            f"rerun extract{' --pooled' if needs.input == 'pooled' else ''} or choose another --head"
        )
    if inputs.text_templates != needs.templates:
        raise LtclipError(f"--head {name} starts from {needs.templates}-template text embeddings; only finetune "
                          f"makes those for input={needs.input} (a cache's text.h5 holds {inputs.text_templates}-template "
                          "ones: the dataset's templates for input=embeds, LIFT's single one for input=pooled)")
    text = torch.as_tensor(inputs.text_embeds, dtype=torch.float32)
    dim = inputs.vector_dim(needs.input)
    if tuple(text.shape) != (inputs.num_classes, dim):
        raise LtclipError(
            f"--head {name}: text embeddings have shape {tuple(text.shape)}, expected "
            f"({inputs.num_classes}, {dim}); use the text.h5 extracted with this cache"
        )
    return text


def _check_text_encoder(name: str, inputs: HeadInputs) -> None:
    """A text tower is given, with one class name per class and features of the embedding size."""
    text = inputs.text_encoder
    if text is None:
        raise LtclipError(f"--head {name} needs the model's text tower and the class names, which only "
                          "train-head (from the cache's model) and finetune (its own) provide; choose another --head")
    if len(text.classnames) != inputs.num_classes or text.embed_dim != int(inputs.embed_dim):
        raise LtclipError(
            f"--head {name}: the text encoder has {len(text.classnames)} class names and "
            f"{text.embed_dim}-d features, the head {inputs.num_classes} classes and {inputs.embed_dim}-d "
            "embeddings; build it with the cache's model and class names"
        )
