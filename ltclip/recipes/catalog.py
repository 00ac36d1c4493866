"""Every registered method as ``ltclip list`` shows it, kept in ``catalog.json`` beside this module,
so that listing the methods and checking an option's value (``--head bogus``) load no torch.

The file is made from the registries themselves (``make catalog``, i.e. ``python -m
ltclip.recipes.catalog``) and a test holds it equal to them: a new loss, head or tuning mode is
registered in code, then the catalog is remade. :func:`registry` imports a registry itself, for what
only it can do: build an entry, parse its options.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from ..config.sections import MAX_LENGTHENING
from ..core.errors import LtclipError

CATALOG_FILE = Path(__file__).with_name("catalog.json")

KINDS = ("losses", "heads", "samplers", "two-stage", "schedules", "tuning")


def registry(kind: str):
    """The :class:`~ltclip.core.registry.Registry` of ``kind`` (one of :data:`KINDS`)."""
    if kind == "losses":
        from ..methods.losses import LOSSES as found
    elif kind == "heads":
        from ..models.heads import HEADS as found
    elif kind == "samplers":
        from ..data.samplers import SAMPLERS as found
    elif kind == "two-stage":
        from ..methods.second_stage import TWO_STAGE as found
    elif kind == "schedules":
        from ..engine.optim import SCHEDULES as found
    elif kind == "tuning":
        from ..models.tuning import TUNING as found
    else:
        raise LtclipError(f"ltclip list {kind!r}: choose one of {', '.join(KINDS)}, recipes")
    return found


@functools.cache
def catalog() -> dict[str, list[dict]]:
    """Kind (:data:`KINDS`) → its entries, each ``{"name", "owner", "about", "options", "defaults"}``
    (``owner``: how option errors name it; ``about``: the summary and training defaults as plain text;
    ``options``: key → default as text; ``defaults``: key → default as JSON, a tuple as a list)."""
    return json.loads(CATALOG_FILE.read_text(encoding="utf-8"))


def names(kind: str) -> list[str]:
    """The registered names of ``kind``, sorted."""
    return [entry["name"] for entry in catalog()[kind]]


def option_defaults(kind: str, name: str) -> tuple[str, dict]:
    """How option errors name entry ``name`` of ``kind``, and its options' defaults typed as the
    registry has them (what :func:`~ltclip.core.registry.parse_options` checks ``key=value`` against)."""
    entry = next(e for e in catalog()[kind] if e["name"] == name)
    return entry["owner"], {k: tuple(v) if isinstance(v, list) else v for k, v in entry["defaults"].items()}


def build_catalog() -> dict[str, list[dict]]:
    """The catalog from the registries (imports every method, hence torch)."""
    out = {}
    for kind in KINDS:
        reg = registry(kind)
        out[kind] = [{"name": name, "owner": f"{reg.kind} {name!r}",
                      "about": "\n".join([plain_text(reg.summary(name)), *_defaults_lines(kind, name, reg)]),
                      "options": {key: str(value) for key, value in reg.options(name).items()},
                      "defaults": reg.options(name)}
                     for name in reg.names()]
    return out


def plain_text(text: str) -> str:
    """Docstring reStructuredText as plain text: ``:func:`~a.f``` → ``f``, double and single backquotes dropped."""
    text = re.sub(r":[\w:]+:`(~?)([^`]*)`", lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    return re.sub(r"``?([^`]+)``?", r"\1", text)


def _defaults_lines(kind: str, name: str, reg) -> list[str]:
    """The training defaults ``train-head`` takes from a head or a second-stage method."""
    from ..models.heads import training_defaults

    if kind == "two-stage" and reg.get(name).defaults:
        return ["train-head --from defaults: " + " ".join(f"{k}={v}" for k, v in reg.get(name).defaults.items())]
    if kind != "heads" or not training_defaults(name).options:
        return []
    head = training_defaults(name)
    by_opts: dict[str, list[str]] = {}  # losses with the same defaults share one phrase
    for loss, opts in head.loss_options.items():
        by_opts.setdefault(" ".join(f"{k}={v}" for k, v in opts.items()), []).append(loss)
    extra = [f"with --loss {' or '.join(losses)}: {opts}" for opts, losses in by_opts.items()]
    extra += [f"at least {head.min_steps} steps on small caches (up to {MAX_LENGTHENING}× the epochs, validated as often as its own)"] if head.min_steps else []
    return ["train-head defaults: " + " ".join(f"{k}={v}" for k, v in head.options.items()) + "".join(f"; {e}" for e in extra)]


def write_catalog(path: Path = CATALOG_FILE) -> Path:
    """Write the catalog the registries make to ``path``."""
    path.write_text(json.dumps(build_catalog(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_catalog()}")
