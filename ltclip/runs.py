"""Run directories: the trained model (head + optional second stage + post-hoc adjustment),
its checkpoint file, the pointer to the features it was trained on, and prediction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.feature_batches import FeatureInputs
from .errors import LtclipError
from .store import FeatureCache

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"


def cache_fingerprint(path: str | Path) -> str:
    """sha256 of a cache file's identity: its attributes, labels and pooled embeddings.

    Token sequences come from the same forward pass as the embeddings, so hashing them (often
    hundreds of GB) would add cost without catching anything more.
    """
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
    def predict(self, inputs: FeatureInputs, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
        """float32 logits ``[N, V, C]`` for every row and stored view of ``inputs``."""
        was_training = self.training
        self.eval()
        out = None
        for x, _, idx in inputs.batches(np.arange(inputs.cache.num_rows), batch_size):
            b, v = x.shape[:2]
            logits = self(x.flatten(0, 1).to(device)).float().view(b, v, -1).cpu().numpy()
            if out is None:
                out = np.empty((inputs.cache.num_rows, v, logits.shape[-1]), np.float32)
            out[idx] = logits
        self.train(was_training)
        return out


def model_payload(head, two_stage=None, tau: float | None = None) -> dict:
    """What ``model.pt`` holds: enough to rebuild every part by name and config."""
    payload = {"head": {"name": head.name, "config": head.config, "state_dict": head.state_dict()}, "tau": tau}
    if two_stage is not None:
        payload["two_stage"] = {"name": two_stage.name, "config": two_stage.config, "state_dict": two_stage.state_dict()}
    return payload


def build_model(payload: dict, class_counts) -> RunModel:
    """Rebuild a :class:`RunModel` from :func:`model_payload`'s dict."""
    from .models.heads import create_head
    from .two_stage import build_two_stage

    spec = payload["head"]
    head = create_head(spec["name"], **spec["config"], from_checkpoint=True)
    head.load_state_dict(spec["state_dict"])
    two_stage = None
    if payload.get("two_stage"):
        ts = payload["two_stage"]
        two_stage = build_two_stage(ts["name"], ts["config"], head.classifier)
        two_stage.load_state_dict(ts["state_dict"])
    return RunModel(head, two_stage, payload.get("tau"), class_counts).eval()


@dataclass
class Run:
    path: Path
    info: dict  # run.json
    config: dict
    model: RunModel

    @property
    def features(self) -> Path:
        return Path(self.info["features"]["dir"])

    def split_file(self, split: str) -> Path:
        return self.features / f"{split}.h5"


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise LtclipError(f"{run_dir}: not a finished run ({RUN_FILE} missing); train it with `ltclip train-head`")
    return json.loads(path.read_text())


def verify_features(info: dict, run_dir: str | Path) -> None:
    """The train cache a run points to must still be the one it was trained on."""
    feats = info["features"]
    train = Path(feats["dir"]) / "train.h5"
    if not train.is_file():
        raise LtclipError(f"{run_dir}: its feature cache {train} is gone (moved?); put it back or retrain")
    now = cache_fingerprint(train)
    if now != feats["train_sha256"]:
        raise LtclipError(
            f"{run_dir} was trained on {train} with fingerprint {feats['train_sha256'][:12]}, but that file now has "
            f"{now[:12]}; the cache changed: retrain or point the run at the original features"
        )


def load_run(run_dir: str | Path, check_features: bool = True, device: str | torch.device = "cpu") -> Run:
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if check_features:
        verify_features(info, run_dir)
    payload = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=False)
    config = json.loads((run_dir / "config.json").read_text())
    return Run(run_dir, info, config, build_model(payload, info["class_counts"]).to(device))
