"""The run folder, a versioned contract written and read here: what ``train-head`` (and later
``finetune``) produce and ``eval`` consumes.

A finished run holds ``config.json`` (reruns it with ``--config``), ``train_log.jsonl``,
``model.pt`` (the model payload, read with ``torch.load(weights_only=True)``) and, written last,
``run.json``: ``schema_version``, ``kind`` (one of :data:`RUN_KINDS`), ``inputs`` (the feature
cache and its fingerprint), the class counts, the method, the selected validation metrics and
provenance. A folder without ``run.json`` is unfinished (``last.pt`` lets it resume; ``inputs.json``,
written when the run starts, holds the fingerprints of the files it reads, which ``--resume`` checks).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..core.atomic import save_json, save_torch
from ..config import provenance
from .feature_batches import FeatureInputs
from ..core.errors import LtclipError
from .store import FeatureCache
from .workspace import RUN_FILE

RUN_SCHEMA_VERSION = 1
RUN_KINDS = ("head", "second_stage", "finetune")
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"


def cache_fingerprint(path: str | Path) -> str:
    """sha256 of a cache file's identity: its attributes, labels and pooled embeddings.

    Token sequences come from the same forward pass as the embeddings, so hashing them (often
    hundreds of GB) would add cost without catching anything more. A run fingerprints its cache when
    it starts and when it finishes: the file is read once while it stays unchanged (same inode, size
    and modification time).
    """
    try:
        found = Path(path).stat()
    except OSError:
        return _read_fingerprint(path)  # FeatureCache says what is wrong, in one line
    return _fingerprint(str(Path(path).resolve()), found.st_ino, found.st_size, found.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _fingerprint(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """:func:`cache_fingerprint` of ``path`` as it is at that inode, size and modification time."""
    return _read_fingerprint(path)


def _read_fingerprint(path: str | Path) -> str:
    with FeatureCache(path) as cache:
        h = hashlib.sha256()
        attrs = {k: v for k, v in cache.attrs.items() if k not in ("ltclip_version",)}
        h.update(json.dumps(attrs, sort_keys=True, default=str).encode())
        h.update(cache.labels.astype(np.int64).tobytes())
        h.update(np.ascontiguousarray(cache.load_embeds()).tobytes())
    return h.hexdigest()


class RunModel(torch.nn.Module):
    """Cache inputs → logits: ``head.features``, then the second stage's classifier (or the head's
    own), then ``− tau · log prior`` when post-hoc logit adjustment chose a ``tau``."""

    def __init__(self, head, two_stage=None, tau: float | None = None, class_counts=None):
        super().__init__()
        self.head = head
        self.two_stage = two_stage
        self.tau = tau
        counts = torch.as_tensor(np.maximum(np.asarray(class_counts, dtype=np.float64), 1) if class_counts is not None else [1.0])
        self.register_buffer("log_prior", torch.log(counts / counts.sum()).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head.features(x)
        logits = self.two_stage(z) if self.two_stage is not None else self.head.classifier(z)
        return logits - self.tau * self.log_prior if self.tau else logits

    @torch.inference_mode()
    def predict(self, inputs: FeatureInputs, batch_size: int = 512, device: str | torch.device = "cpu",
                rows: np.ndarray | None = None) -> np.ndarray:
        """float32 logits ``[len(rows), V, C]`` for ``rows`` (default: every row) and every stored view."""
        was_training = self.training
        self.eval()
        rows = np.arange(inputs.cache.num_rows) if rows is None else np.asarray(rows)
        out = None
        for start, (x, _, _) in zip(range(0, len(rows), batch_size), inputs.batches(rows, batch_size)):
            b, v = x.shape[:2]
            logits = self(x.flatten(0, 1).to(device)).float().view(b, v, -1).cpu().numpy()
            if out is None:
                out = np.empty((len(rows), v, logits.shape[-1]), np.float32)
            out[start : start + b] = logits
        self.train(was_training)
        return out


def head_record(head) -> dict:
    """A head as ``model.pt`` stores it: name, config and state; a prompt head adds what finds its
    text tower again (``text_encoder``: the model's identity and the class names)."""
    record = {"name": head.name, "config": head.config, "state_dict": head.state_dict()}
    if head.needs.text_encoder:
        record["text_encoder"] = head.text_encoder.record()
    return record


def build_head(record: dict, backbone=None):
    """The head :func:`head_record` stored; a prompt head's text tower is ``backbone``'s (a finetuned
    run's own encoder) or, without one, the recorded model's, loaded by name."""
    from ..models.heads import rebuild_head

    tower = None
    if "text_encoder" in record:
        from ..models.text_prompts import load_text_encoder, text_encoder

        names = record["text_encoder"]["classnames"]
        tower = (text_encoder(backbone, names) if backbone is not None
                 else load_text_encoder(record["text_encoder"], names, "the run's recorded model"))
    head = rebuild_head(record["name"], record["config"], tower)
    head.load_state_dict(record["state_dict"])
    return head


def model_payload(head, two_stage=None, tau: float | None = None) -> dict:
    """What ``model.pt`` holds: enough to rebuild every part by name and config."""
    payload = {"schema_version": RUN_SCHEMA_VERSION, "head": head_record(head), "tau": tau}
    if two_stage is not None:
        payload["two_stage"] = {"name": two_stage.name, "config": two_stage.config, "state_dict": two_stage.state_dict()}
    return payload


def build_model(payload: dict, class_counts) -> RunModel:
    """Rebuild a :class:`RunModel` from :func:`model_payload`'s dict."""
    from ..methods.second_stage import build_two_stage

    head = build_head(payload["head"])
    two_stage = None
    if payload.get("two_stage"):
        ts = payload["two_stage"]
        two_stage = build_two_stage(ts["name"], ts["config"], head.classifier)
        two_stage.load_state_dict(ts["state_dict"])
    return RunModel(head, two_stage, payload.get("tau"), class_counts).eval()


def finetune_payload(cfg, backbone, model, num_classes: int) -> dict:
    """``model.pt`` of a finetuned run: the head, and the base encoder's identity, tuning (with the class count
    that sets its width) and trained entries."""
    from ..models.tuning import trainable_state

    tuning = cfg.tuning
    return {
        "schema_version": RUN_SCHEMA_VERSION,
        "head": head_record(model.head),
        "encoder": {"model": cfg.model, "pretrained": cfg.pretrained, "preprocess_from": cfg.preprocess_from,
                    "identity": backbone.identity, "tune": tuning.tune, "tune_opts": dict(tuning.tune_opts), "num_classes": num_classes,
                    "state_dict": trainable_state(backbone.model)},
        "tau": None,
    }


def build_encoder_classifier(payload: dict, device="cpu"):
    """``(backbone, EncoderClassifier)`` of a finetuned run: the base model loaded by name, checked
    against the identity the run recorded, the tuning applied and the trained entries loaded."""
    from ..models.backbone import load_backbone
    from ..models.encoder_classifier import EncoderClassifier
    from ..models.tuning import apply_tuning, load_trainable_state

    enc = payload["encoder"]
    if "num_classes" not in enc and enc["tune"] != "frozen":
        raise LtclipError(f"this run tuned its encoder with --tune {enc['tune']} as ltclip defined the modes before it took "
                          "LIFT's definitions (docs/methods.md); retrain it with this version")
    backbone = load_backbone(enc["model"], enc["pretrained"], device=device, preprocess_from=enc["preprocess_from"])
    changed = sorted(k for k in set(enc["identity"]) | set(backbone.identity) if enc["identity"].get(k) != backbone.identity.get(k))
    if changed:
        raise LtclipError(f"the base model {enc['model']} / {enc['pretrained']} is not the one the run was trained on "
                          f"({', '.join(changed)} differ); restore that model or retrain")
    apply_tuning(backbone.model, enc["tune"], dict(enc["tune_opts"]), num_classes=enc.get("num_classes"))
    load_trainable_state(backbone.model, enc["state_dict"])
    head = build_head(payload["head"], backbone)
    return backbone, EncoderClassifier(backbone, head).to(device).eval()


def finetuned_backbone(run_dir: str | Path, device="cpu"):
    """The encoder of a finetuned run as a :class:`Backbone` for ``extract --from-run``: its tuning and
    trained entries applied, its normalisation, and an identity naming the run's ``model.pt``."""
    from ..data.image_batches import eval_transform
    from ..data.manifests import file_sha256

    run = Path(run_dir)
    info = read_run_info(run)
    if info["kind"] != "finetune":
        raise LtclipError(f"--from-run {run}: a {info['kind']} run has no encoder of its own; pass a finetuned run")
    backbone, _ = build_encoder_classifier(read_payload(run, info), device)
    normalize = json.loads((run / CONFIG_FILE).read_text()).get("normalize", "model")
    backbone.preprocess = eval_transform(backbone.preprocess, backbone.preprocess_cfg, normalize)
    backbone.identity = {**backbone.identity, "finetuned_run_sha256": file_sha256(run / MODEL_FILE), "normalize": normalize}
    return backbone


def features_input(features: Path) -> dict:
    """The ``inputs`` record of a run trained on the cache folder ``features``."""
    return {"features": {"dir": str(features.resolve()), "train_sha256": cache_fingerprint(features / "train.h5")}}


def method_record(method, tau: float | None = None) -> dict:
    """The ``method`` entry of a first-stage run's ``run.json`` (a ``MethodConfig``; ``tau``: post-hoc LA)."""
    return {"head": method.head, "head_opts": dict(method.head_opts), "loss": method.loss,
            "loss_opts": dict(method.loss_opts), "sampler": method.sampler, "two_stage": None, "posthoc_la": tau}


def write_run(out: Path, kind: str, payload: dict, inputs: dict, counts, **info) -> dict:
    """Write ``model.pt`` and then ``run.json`` (whose presence marks the run finished)."""
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind {kind!r} is not one of {RUN_KINDS}")
    save_torch(out / MODEL_FILE, payload)
    record = {"schema_version": RUN_SCHEMA_VERSION, "kind": kind, "ltclip_version": __version__, "inputs": inputs,
              "num_classes": int(len(counts)), "class_counts": np.asarray(counts).tolist(), "provenance": provenance(), **info}
    save_json(out / RUN_FILE, record)
    return record


@dataclass
class Run:
    path: Path
    info: dict  # run.json
    config: dict
    model: RunModel

    @property
    def on_images(self) -> bool:
        """A finetuned run: it reads images, not a feature cache."""
        return self.info["kind"] == "finetune"

    @property
    def features(self) -> Path:
        return Path(self.info["inputs"]["features"]["dir"])


def _check_schema(run_dir: Path, found, what: str) -> None:
    if found is None:
        raise LtclipError(f"{run_dir}: {what} has no schema_version (written before ltclip's run schema {RUN_SCHEMA_VERSION}); "
                          "train the run again with this ltclip")
    if not isinstance(found, int) or found > RUN_SCHEMA_VERSION or found < 1:
        raise LtclipError(f"{run_dir}: {what} has schema_version {found!r} but ltclip {__version__} reads runs up to "
                          f"{RUN_SCHEMA_VERSION}; upgrade ltclip (or retrain the run with this version)")


def read_run_info(run_dir: str | Path) -> dict:
    """``run.json`` of a finished run, its schema checked."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        hint = "resume it with --resume" if (run_dir / "last.pt").is_file() else "train it with `ltclip train-head`"
        raise LtclipError(f"{run_dir}: not a finished run ({RUN_FILE} missing); {hint}")
    try:
        info = json.loads(path.read_text())
    except ValueError:
        raise LtclipError(f"{path}: not valid JSON; the run is damaged: train it again") from None
    _check_schema(run_dir, info.get("schema_version"), RUN_FILE)
    if info.get("kind") not in RUN_KINDS:
        raise LtclipError(f"{path}: kind {info.get('kind')!r} is not one of {', '.join(RUN_KINDS)}; upgrade ltclip")
    _check_fields(path, info)
    return info


def _check_fields(path: Path, info: dict) -> None:
    """The fields of ``run.json`` that readers use, of the types they need."""
    counts = info.get("class_counts")
    features = info["inputs"].get("features") if isinstance(info.get("inputs"), dict) else None
    problems = {
        "num_classes": not _is_int(info.get("num_classes")) or info["num_classes"] < 1,
        "class_counts": not isinstance(counts, list) or not all(map(_is_int, counts)) or len(counts) != info.get("num_classes"),
        "method": not isinstance(info.get("method"), dict),
        "inputs": not isinstance(info.get("inputs"), dict) or (info["kind"] != "finetune" and not (
            isinstance(features, dict) and all(isinstance(features.get(k), str) for k in ("dir", "train_sha256")))),
    }
    bad = [key for key, wrong in problems.items() if wrong]
    if bad:
        shown = repr(info.get(bad[0]))
        raise LtclipError(f"{path}: field {bad[0]} is {shown[:60] + '…' if len(shown) > 60 else shown}, not what ltclip "
                          "writes there; the run is damaged: train it again")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_features(info: dict, run_dir: str | Path) -> None:
    """The train cache a run points to must still be the one it was trained on."""
    feats = info["inputs"]["features"]
    train = Path(feats["dir"]) / "train.h5"
    if not train.is_file():
        raise LtclipError(f"{run_dir}: its feature cache {train} is gone (moved?); put it back or retrain")
    now = cache_fingerprint(train)
    if now != feats["train_sha256"]:
        raise LtclipError(
            f"{run_dir} was trained on {train} with fingerprint {feats['train_sha256'][:12]}, but that file now has "
            f"{now[:12]}; the cache changed: retrain or point the run at the original features"
        )


def read_payload(run_dir: Path, info: dict) -> dict:
    """``model.pt`` of a finished run, checked against its ``run.json``: the head its method names, with
    the run's class count and head options (a ``model.pt`` copied in from another run is refused)."""
    path = run_dir / MODEL_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LtclipError(f"{run_dir}: {MODEL_FILE} is missing; the run is damaged: train it again") from None
    except Exception as err:  # unpickling errors of any kind
        raise LtclipError(f"{path}: unreadable ({type(err).__name__}); train the run again") from None
    head = payload.get("head") if isinstance(payload, dict) else None
    if not isinstance(head, dict) or not isinstance(head.get("config"), dict) or not isinstance(head.get("state_dict"), dict):
        raise LtclipError(f"{path}: not an ltclip run model (no head record); the run is damaged: train it again")
    _check_schema(run_dir, payload.get("schema_version"), MODEL_FILE)
    method = info.get("method") if isinstance(info.get("method"), dict) else {}
    config, opts = _as_json(head["config"]), _as_json(method.get("head_opts") or {})
    differ = ([f"head {head.get('name')!r} vs {method.get('head')!r}"] if head.get("name") != method.get("head") else [])
    differ += [f"num_classes {config.get('num_classes')!r} vs {info['num_classes']!r}"] if config.get("num_classes") != info["num_classes"] else []
    differ += [f"{k} {config[k]!r} vs {v!r}" for k, v in sorted(opts.items()) if k in config and config[k] != v]
    if differ:
        raise LtclipError(f"{path} is not the model {run_dir / RUN_FILE} describes ({'; '.join(differ)}): it was replaced "
                          "(copied from another run?); restore the run's own model.pt or train it again")
    return payload


def _as_json(value):
    """``value`` as JSON stores it (tuples as lists), for comparing a payload with ``run.json``."""
    return json.loads(json.dumps(value, default=str))


def load_run(run_dir: str | Path, check_features: bool = True, device: str | torch.device = "cpu") -> Run:
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if check_features and info["kind"] != "finetune":
        verify_features(info, run_dir)
    payload = read_payload(run_dir, info)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    if info["kind"] == "finetune":
        return Run(run_dir, info, config, build_encoder_classifier(payload, device)[1])
    try:
        model = build_model(payload, info["class_counts"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:  # weights of other shapes than the config's
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LtclipError(f"{run_dir / MODEL_FILE}: its weights do not fit its head ({first[:200]}); the run is "
                          "damaged: train it again") from None
    return Run(run_dir, info, config, model.to(device))
