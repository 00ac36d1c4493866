"""``ltclip eval``: shot-group metrics for trained runs and for zero-shot / kNN / NCM baselines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..core.atomic import save_json
from ..config import EvalConfig, flag
from ..config.fields import check_values
from ..artifacts.feature_batches import FeatureInputs
from ..artifacts.outputs import check_output_files, dataset_inputs, folder_input, run_folder_inputs
from ..core.distributed import DistContext, resolve_device
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views, evaluate
from ..evaluation.plots import per_class_path
from ..evaluation.retrieval import class_means, knn_logits, ncm_logits, normalise, retrieval_mix
from ..artifacts.image_model import CLIP_LOGIT_SCALE
from ..artifacts.runs import CONFIG_FILE, load_run, read_run_info
from ..artifacts.store import FeatureCache, zero_shot_text
from ..artifacts.workspace import sweep_point


CACHE_BATCH = 1024  # --batch-size's default for cached rows (features or tokens: small beside an image's views)


def _split_cache(features: Path, split: str, owner: str) -> FeatureCache:
    path = features / f"{split}.h5"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in features.glob("*.h5") if p.stem != "text")) or "none"
        raise LtclipError(f"{owner}: the cache {features} has no {split!r} split (it has: {have}); pass --split or extract it")
    return FeatureCache(path)


def _mean_embedding(cache: FeatureCache, views: str) -> np.ndarray:
    """Normalised query embeddings: the mean of the normalised views (or the first view)."""
    e = normalise(cache.load_embeds().astype(np.float32).reshape(-1, cache.embed_dim)).reshape(cache.num_rows, cache.views, -1)
    return normalise(e[:, 0] if views == "first" else e.mean(1))


def _train_database(features: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stored view of every training image, normalised, with labels and the class counts."""
    with _split_cache(features, "train", str(features)) as train:
        db = normalise(train.load_embeds().astype(np.float32).reshape(-1, train.embed_dim))
        return db, np.repeat(train.labels, train.views), train.class_counts()


def _result(logits, labels, counts, cfg: EvalConfig, **identity) -> dict:
    metrics = evaluate(logits, labels, counts, many_threshold=cfg.many, few_threshold=cfg.few)
    return {**identity, "split": cfg.split, "train_counts": np.asarray(counts).tolist(), **metrics}


def _knn_log_probs(query: np.ndarray, features: Path, cfg: EvalConfig, k: int) -> np.ndarray:
    db, db_labels, counts = _train_database(features)
    return knn_logits(query, db, db_labels, len(counts), k=k, temperature=cfg.temperature, backend=cfg.backend)


def _eval_file(run_dir: Path, split: str) -> Path:
    """Where eval keeps a run's result on ``split``, in the run folder."""
    return run_dir / ("eval.json" if split == "test" else f"eval_{split}.json")


def evaluate_run(run_dir: str, cfg: EvalConfig, device, name: str) -> dict:
    """Score run ``run_dir`` on ``cfg.split``, its row labelled ``name`` (:func:`~ltclip.evaluation.report.run_labels`)."""
    run = load_run(run_dir, device=device)
    counts = np.asarray(run.info["class_counts"])
    if run.on_images:
        from .image_eval import image_run_logits

        logits, labels = image_run_logits(run, cfg, device)
        result = _result(logits, labels, counts, cfg, name=name, kind="run",
                         dataset=run.info.get("dataset"), run_dir=str(run.path))
        save_json(_eval_file(run.path, cfg.split), result)
        return result
    with _split_cache(run.features, cfg.split, str(run_dir)) as cache:
        inputs = FeatureInputs(cache, run.model.head.input, device=device)
        logits = average_views(run.model.predict(inputs, cfg.batch_size or CACHE_BATCH, device), cfg.views)
        labels = cache.labels
        if cfg.retrieval_mix > 0:
            knn = _knn_log_probs(_mean_embedding(cache, cfg.views), run.features, cfg, cfg.retrieval_k)
            logits = retrieval_mix(logits, knn, cfg.retrieval_mix)
            name += f" + kNN mix {cfg.retrieval_mix:g}"
    result = _result(logits, labels, counts, cfg, name=name, kind="run", dataset=run.info.get("dataset"), run_dir=str(run.path))
    save_json(_eval_file(run.path, cfg.split), result)
    return result


def evaluate_baselines(cfg: EvalConfig) -> list[dict]:
    """Zero-shot (the cache's text classifier), kNN and NCM on normalised embeddings."""
    features = Path(cfg.features)
    results = []
    with _split_cache(features, cfg.split, f"--features {features}") as cache:
        query, labels, dataset = _mean_embedding(cache, cfg.views), cache.labels, cache.attrs.get("dataset")
        with FeatureCache(features / "train.h5") as train:
            counts = train.class_counts()
        if cfg.zero_shot:
            text = zero_shot_text(features)
            per_view = normalise(cache.load_embeds().astype(np.float32).reshape(-1, cache.embed_dim)) @ text.embeds.T
            logits = average_views(CLIP_LOGIT_SCALE * per_view.reshape(cache.num_rows, cache.views, -1), cfg.views)
            results.append(_result(logits, labels, counts, cfg, name="zero-shot CLIP", kind="zero-shot", dataset=dataset))
        if cfg.knn > 0:
            results.append(_result(_knn_log_probs(query, features, cfg, cfg.knn), labels, counts, cfg,
                                   name=f"kNN (k={cfg.knn})", kind="knn", dataset=dataset))
        if cfg.ncm:
            db, db_labels, _ = _train_database(features)
            logits = ncm_logits(query, class_means(db, db_labels, len(counts)))
            results.append(_result(logits, labels, counts, cfg, name="NCM", kind="ncm", dataset=dataset))
    return results


def _check_outputs(cfg: EvalConfig, infos: dict[str, dict]) -> None:
    """``--report/--json/--csv/--plot`` (and the per-class figure beside ``--plot``) are writable files, each
    its own, replacing nothing eval reads: refused before anything is evaluated. ``infos``: run.json by run."""
    inputs = [item for run, info in infos.items() for item in run_folder_inputs(run, info)]
    inputs += [item for run, info in infos.items() if info["kind"] == "finetune" for item in _data_inputs(info, cfg)]
    if cfg.features:
        inputs.append(folder_input(cfg.features, "the feature cache"))
    outputs = {f"--{option}": getattr(cfg, option) for option in ("report", "json", "csv", "plot")}
    if cfg.plot:
        outputs["--plot's per-class figure"] = per_class_path(cfg.plot)
    check_output_files(outputs, inputs, own={f"the eval file of {run}": _eval_file(Path(run), cfg.split) for run in infos})


# The options that only say how finetuned runs view their images (a cache's views were fixed when it was extracted).
IMAGE_OPTIONS = ("data_root", "test_views", "eval_resize", "interpolation", "workers", "decode")


def _check_image_options(cfg: EvalConfig, infos: dict[str, dict]) -> None:
    """An image option given where no run is scored on images is refused, not silently unused."""
    if any(info["kind"] == "finetune" for info in infos.values()):
        return
    defaults = EvalConfig()
    for option in IMAGE_OPTIONS:
        if getattr(cfg, option) != getattr(defaults, option):
            raise LtclipError(f"{flag(option, EvalConfig)}: only finetuned runs are scored on images, and none is named "
                              f"(a cache's views were chosen by `ltclip extract --test-views`); drop {flag(option, EvalConfig)}")


def _data_inputs(info: dict, cfg: EvalConfig) -> list:
    """The dataset files a finetuned run is scored on (its split files, class names and images)."""
    from ..config import DataConfig, from_dict
    from ..data.registry import open_dataset

    data = from_dict(DataConfig, info["inputs"]["data"])
    if cfg.data_root:
        data = dataclasses.replace(data, data_root=cfg.data_root)
    return dataset_inputs(open_dataset(data), data)


def _run_facts(run: str, info: dict):
    """What run ``run``'s row label is made of: run.json, config.json ({} where it is missing or damaged)
    and, for a sweep's point or best run, its grid values."""
    from ..evaluation.report import RunFacts

    try:
        config = json.loads((Path(run) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    point = sweep_point(Path(run))
    return RunFacts(info, config, *(point or ()))


def _option_defaults(option: str, name: str) -> dict:
    """The options of ``--head`` / ``--loss`` entry ``name`` and their defaults ({} for an unknown name)."""
    from ..recipes.catalog import registry

    entries = registry({"head": "heads", "loss": "losses"}[option])
    return entries.options(name) if name in entries else {}


def run_eval(cfg: EvalConfig) -> list[dict]:
    """Evaluate runs and baselines; write eval.json per run and the requested reports."""
    from ..evaluation.plots import write_plots
    from ..evaluation.report import run_labels, write_csv, write_json, write_markdown

    check_values(cfg)  # --views among VIEW_POOLS, --retrieval-mix in [0, 1], ... (also for a config built in Python)
    wants_baseline = cfg.zero_shot or cfg.knn > 0 or cfg.ncm
    if wants_baseline and not cfg.features:
        raise LtclipError("--zero-shot / --knn / --ncm need --features DIR (the cache to evaluate)")
    if not cfg.runs and not wants_baseline:
        raise LtclipError("nothing to evaluate: name run folders, or --zero-shot / --knn K / --ncm with --features")
    infos = {run: read_run_info(run) for run in cfg.runs}
    _check_image_options(cfg, infos)
    _check_outputs(cfg, infos)
    datasets = {info.get("dataset") for info in infos.values()}
    if wants_baseline:
        with _split_cache(Path(cfg.features), cfg.split, f"--features {cfg.features}") as cache:
            datasets.add(cache.attrs.get("dataset"))
    if len(datasets) > 1 and not cfg.allow_mixed:  # refused before anything is written
        raise LtclipError(f"the runs come from different datasets ({', '.join(sorted(map(str, datasets)))}); "
                          "pass --allow-mixed to put them in one report")
    device = resolve_device(cfg.device, DistContext())
    results = evaluate_baselines(cfg) if wants_baseline else []
    names = run_labels({run: _run_facts(run, info) for run, info in infos.items()}, _option_defaults)
    results += [evaluate_run(r, cfg, device, names[r]) for r in cfg.runs]
    if cfg.report:
        write_markdown(results, cfg.report)
    if cfg.json:
        write_json(results, cfg.json)
    if cfg.csv:
        write_csv(results, cfg.csv)
    if cfg.plot:
        write_plots(results, cfg.plot, many_threshold=cfg.many, few_threshold=cfg.few)
    return results

