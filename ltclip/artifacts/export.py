"""An image classifier as one self-contained file for another program: the model (preprocessed images
``[B, 3, H, W]`` → logits ``[B, C]``) as TorchScript (``torch.jit.load``) or a ``torch.export`` program
(``torch.export.load``), with the class names and the preprocessing stored inside as ``ltclip.json``.

Trained LoRA updates are merged into their weights first, so the graph is the base architecture. The
graph is traced on a random batch and checked on a batch of another size against the model itself; a
model whose trace does not reproduce it (Python branches on a shape, a round trip through numpy) is
refused in one line.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config.values import EXPORT_FORMATS as FORMATS
from ..core.atomic import atomic_path
from ..core.errors import LtclipError
from ..models.tuning.lora import merge_lora
from .image_model import ImageClassifier

METADATA_FILE = "ltclip.json"  # the name of the metadata inside the exported file
FORMAT_VERSION = 1


def preprocessing(classifier: ImageClassifier) -> dict:
    """The center test view as plain values: resize the short side to ``resize`` (``interpolation``),
    crop the centre ``size`` (H, W), scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel."""
    cfg = classifier.preprocess_cfg
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    own = not classifier.eval_resize  # the model's own preprocessing: open_clip resizes to its resolution
    resize = min(height, width) if own else classifier.eval_resize
    interpolation = (None if own else classifier.interpolation) or cfg.get("interpolation", "bicubic")
    return {"size": [int(height), int(width)], "resize": int(resize),
            "resize_mode": cfg.get("resize_mode", "shortest") if own else "shortest", "interpolation": interpolation,
            "crop": "center", "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "transform": classifier.views("center").description}


def metadata(classifier: ImageClassifier, source: dict, fmt: str, merged: int) -> dict:
    from .. import __version__

    return {"ltclip_export": FORMAT_VERSION, "format": fmt, "classnames": list(classifier.classnames),
            "num_classes": len(classifier.classnames), "preprocess": preprocessing(classifier), "source": source,
            "lora_weights_merged": merged, "input": "float32 [B, 3, H, W], preprocessed", "output": "float32 logits [B, C]",
            "torch": torch.__version__, "ltclip": __version__}


def check_format(fmt: str) -> None:
    """``fmt`` is one of :data:`FORMATS` (a Python caller's plain string; the command's config checks its own)."""
    if fmt not in FORMATS:
        raise LtclipError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def export_classifier(classifier: ImageClassifier, out: str | Path, *, fmt: str = "torchscript", batch_size: int = 2,
                      source: dict, owner: str) -> dict:
    """Write ``classifier`` to ``out`` (atomically) as ``fmt``; its metadata. Its model's LoRA is merged in
    place. ``owner`` names the model in errors."""
    check_format(fmt)
    model = classifier.model.eval()
    merged = merge_lora(model)
    device = next(model.parameters()).device
    height, width = preprocessing(classifier)["size"]
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, 3, height, width, generator=generator).to(device) for n in (batch_size, batch_size + 1))
    info = metadata(classifier, source, fmt, merged)
    extra = {METADATA_FILE: json.dumps(info, indent=1)}
    with torch.no_grad():
        program = _traced(model, example, check, fmt, owner)
        with atomic_path(out) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.save` is deprecated", FutureWarning)
            if fmt == "torchscript":
                torch.jit.save(program, str(tmp), _extra_files=extra)
            else:  # through memory: torch.export.save warns about a file name not ending in .pt2
                buffer = io.BytesIO()
                torch.export.save(program, buffer, extra_files=extra)
                tmp.write_bytes(buffer.getvalue())
    return info


def _traced(model: nn.Module, example: torch.Tensor, check: torch.Tensor, fmt: str, owner: str):
    """The traced program, refused in one line unless it reproduces ``model`` on ``check`` (another batch size)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if fmt == "torchscript":
                program = torch.jit.trace(model, example, check_trace=False)
                run = program
            else:
                batch = torch.export.Dim("batch")
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                run = program.module()
            got, expected = run(check), model(check)
            same = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
            problem = None if same else f"on a batch of {len(check)} its trace gives other logits than the model"
        except Exception as err:  # whatever tracing or running the trace raised: reported in one line
            problem = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    if problem:
        said = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        why = f" (the tracer warned: {said[0].split('.')[0]})" if said else ""
        raise LtclipError(f"{owner} cannot be exported as {fmt}: {problem}{why}; it can still be used with `ltclip predict` "
                          "or ltclip.load")
    return program
