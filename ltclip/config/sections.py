"""The stage configs: frozen dataclasses that the CLI builds, a stage consumes and a run saves.

Each stage's config is composed of shared sections (``DataConfig``, ``OptimConfig``,
``MethodConfig``, ``TuningConfig``). Every field is an option, declared once with :func:`option`:
its default, help text, flag and choices; the commands of ``ltclip.cli`` are generated from these
fields, and a saved config (``config.json``, ``extract.json``) reruns its stage with ``--config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import REQUIRED, Options, option
from .values import (
    BAD_IMAGE_POLICIES, DECODES, DEVICES, ENCODE_PRECISIONS, INTERPOLATIONS, NORMALIZATIONS, OPTIMIZERS, SCHEDULE_UNITS, SEARCH_BACKENDS, TEST_VIEWS,
    TOKEN_DTYPES, TOKEN_SCALES, TRAIN_CROPS, TRAIN_PRECISIONS, VIEW_POOLS,
)

@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where its files are."""

    dataset: str = option("synthetic", "Registered dataset (`ltclip datasets list`) or 'custom'.", short="-d")
    data_root: str = option(".", "Folder the split files' image paths are relative to.", input="data-root")
    manifest_dir: str | None = option(None, "Folder holding the split files.", default_text="the data root", input="folder")
    train_list: str | None = option(None, "Your own train split file ('relative/path label' lines).", input="data-file")
    val_list: str | None = option(None, "Your own val split file.", input="data-file")
    test_list: str | None = option(None, "Your own test split file.", input="data-file")
    classnames: str | None = option(None, "Class-name file ('key name' or one name per line, or categories JSON).",
                                    input="data-file")
    templates: str | None = option(None, "Prompt templates: openai_imagenet, simple, synthetic, cifar, or a file.",
                                   default_text="the dataset's")
    imbalance: float = option(100.0, "CIFAR-100-LT imbalance ratio (10, 50, 100).", minimum=1)
    download: bool = option(False, "Let torchvision download CIFAR-100 (needs internet).")
    subset_seed: int = option(0, "Which images CIFAR-100-LT keeps.", minimum=0)
    allow_outside_root: bool = option(False, "Read split-file paths that lead outside --data-root (absolute, '..', "
                                             "or through a link).")

    def split_files(self) -> dict[str, str]:
        lists = {"train": self.train_list, "val": self.val_list, "test": self.test_list}
        return {k: v for k, v in lists.items() if v}


@dataclass(frozen=True)
class OptimConfig:
    """How a model is optimised (the engine's settings); ``batch_size`` rows make one optimizer step."""

    epochs: int = option(10, "Epochs (one epoch draws as many rows as the train split has).", minimum=1)
    steps: int | None = option(None, "Total optimizer steps instead of --epochs.", minimum=1)
    batch_size: int = option(256, "Rows per optimizer step, over all processes.", minimum=1)
    accum: int = option(1, "Micro-batches per optimizer step (gradient accumulation).", minimum=1)
    optimizer: str = option("adamw", "adamw or sgd (timm's factory).", one_of=OPTIMIZERS)
    lr: float = option(1e-3, "Peak learning rate.", above=0)
    weight_decay: float = option(1e-4, "Weight decay.", minimum=0)
    momentum: float = option(0.9, "SGD momentum.", minimum=0, below=1)
    nesterov: bool = option(False, "Nesterov momentum for sgd.")
    decay_1d: bool = option(True, "Weight decay also on biases, norms and other 1-D parameters.")
    schedule: str = option("cosine", "Learning-rate schedule per step.", choices="schedules")
    schedule_unit: str = option("step", "step (the schedule advances every optimizer step) or epoch (the lr is constant "
                                        "within an epoch, as LIFT's CosineAnnealingLR stepped per epoch).", one_of=SCHEDULE_UNITS)
    warmup: float = option(0.0, "Linear warm-up, in epochs.", minimum=0)
    warmup_steps: int | None = option(None, "Linear warm-up in optimizer steps, instead of --warmup epochs.", minimum=0)
    grad_clip: float = option(0.0, "Clip the gradient norm (0: off).", minimum=0)
    precision: str = option("fp32", "fp32, bf16, fp16 (autocast; fp16 on CUDA with a GradScaler) or amp (fp16 on CUDA, fp32 elsewhere).", one_of=TRAIN_PRECISIONS)
    seed: int = option(0, "Seed of the initialisation, sampler and views.", minimum=0)
    eval_every: int = option(0, "Also validate every N steps (0: at epoch ends only).", minimum=0)
    checkpoint_every: int = option(0, "Also checkpoint every N steps (0: at epoch ends only).", minimum=0)
    eval_every_epochs: int = option(1, "Validate and checkpoint at every N-th epoch end and the last (1: every epoch); "
                                       "a default length lengthened on a small cache takes its lengthening.", minimum=1)
    select: str = option("balanced_accuracy", "Validation metric that picks the kept weights (highest; lowest for nll and ece), "
                                              "or last: the last epoch's weights (validation only logged).")


# A second stage retrains a small layer on fixed features: SGD with a large step, as in Kang et al.
SECOND_STAGE_OPTIM = OptimConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=512)


# Fine-tuning an encoder: LIFT's protocol (github.com/shijxcs/LIFT trainer.py, utils/config.py): SGD
# with momentum, weight decay on every tuned parameter, a cosine stepped per epoch with no warm-up, AMP
# on CUDA, the last epoch's weights.
FINETUNE_OPTIM = OptimConfig(batch_size=128, optimizer="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9,
                             schedule_unit="epoch", precision="amp", select="last")


@dataclass(frozen=True)
class TuningConfig:
    """What of the image encoder trains (``ltclip list tuning``) and how."""

    tune: str = option("frozen", "What of the encoder trains.", choices="tuning")
    tune_opts: Options = option(Options(), "Tuning option key=value (repeatable), e.g. rank=8.", flag="--tune-opt", choices_of="tune")
    backbone_lr: float | None = option(None, "Peak lr of the encoder's trained parameters.", default_text="--lr", above=0)
    grad_checkpointing: bool = option(False, "Recompute encoder activations in the backward pass (less memory).")


@dataclass(frozen=True)
class MethodConfig:
    """What is trained: the head, the loss, the sampler and their options (parsed: :class:`Options`)."""

    head: str = option("decoder", "Head.", choices="heads")
    head_opts: Options = option(Options(), "Head option key=value (repeatable), e.g. depth=3.", flag="--head-opt", choices_of="head")
    loss: str = option("ce", "Loss.", choices="losses")
    loss_opts: Options = option(Options(), "Loss option key=value (repeatable), e.g. tau=1.", flag="--loss-opt", choices_of="loss")
    sampler: str = option("instance", "Sampler.", choices="samplers")


# A toy cache of a few hundred rows (one step an epoch) would otherwise train hundreds of epochs,
# each validated and checkpointed: --min-steps grows the head's default epochs by this factor at most.
MAX_LENGTHENING = 5

_DEVICE = "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N."
_WORKERS = "DataLoader decode workers."
_WORKERS_DEFAULT = "this process's share of the CPUs, at most 8"
_OUT_RUN = "Run folder (never a finished run)."


@dataclass(frozen=True)
class ExtractConfig:
    """``ltclip extract``: the frozen encoder's embeddings (and tokens) of every split, cached."""

    out: str = option(REQUIRED, "Output folder: train.h5, val.h5, test.h5, text.h5.", short="-o",
                      default_text="features/DATASET-MODEL-PRETRAINED")
    recipe: str | None = option(None, "Named recipe (`ltclip list recipes`): its options are the defaults, any option given "
                                      "wins; the cache records it.")
    data: DataConfig = DataConfig()
    splits: tuple[str, ...] = option((), "Splits to extract, comma-separated or repeated.", default_text="every split the dataset has")
    model: str = option("ViT-B-16", "open_clip model name (or local-dir:/path).", short="-m")
    pretrained: str = option("openai", "open_clip tag, checkpoint file, or 'none' (random).", short="-p", input="weights")
    preprocess_from: str | None = option(None, "Tag whose preprocessing a checkpoint file needs.")
    tokens: bool = option(True, "Also store the ViT token sequence (the decoder head needs it).")
    pooled: bool = option(False, "Also store the ViT's pooled feature before the projection, ln_post(CLS), and "
                                 "LIFT's text start for it (heads with --head-opt input=pooled).")
    batch_size: int = option(256, "Images per forward pass.", minimum=1)
    workers: int | None = option(None, _WORKERS, default_text=_WORKERS_DEFAULT, minimum=0)
    device: str = option("auto", _DEVICE, one_of=DEVICES)
    precision: str = option("fp32", "fp32, fp16 or bf16 (autocast).", one_of=ENCODE_PRECISIONS)
    test_views: str = option("center", "center, flip, fivecrop or tencrop views of val/test images.", one_of=TEST_VIEWS)
    train_views: int = option(0, "K seeded augmented views per training image (0: the model's preprocessing).", minimum=0)
    eval_resize: int | None = option(None, "Resize the short side of val/test images to this before cropping, "
                                           "e.g. 256 (LIFT's center crop) or 248 (LIFT's fivecrop).",
                                     default_text="the model's preprocessing; ×256/224 for five and ten crops", minimum=0)
    interpolation: str | None = option(None, "bilinear or bicubic resampling of the train views and the --eval-resize views.",
                                       default_text="the model's (bicubic for CLIP)", one_of=INTERPOLATIONS)
    normalize: str = option("model", "model (the model's mean/std) or imagenet (the seed code's), for every split.", one_of=NORMALIZATIONS)
    bad_images: str = option("fail", "fail, or skip (logged; zero features).", one_of=BAD_IMAGE_POLICIES)
    decode: str = option("cpu", "cpu (PIL in the DataLoader workers) or device (the workers read the files; JPEGs are decoded "
                                "and cropped on --device, other files decoded on the CPU).", one_of=DECODES)
    block_size: int = option(1024, "Rows written (and resumed) together.", minimum=1)
    seed: int = option(0, "Seed of the train views.", minimum=0)
    from_run: str | None = option(None, "A finetuned run: extract with its encoder (its model and weights).", flag="--from-run",
                                  input="run")
    token_pool: int = option(1, "Average the patch tokens over K×K windows (CLS kept; 1: no pooling).", minimum=1)
    token_dtype: str = option("float16", "Token storage: float16, int8 or fp8 (e4m3), the last two with a scale.", one_of=TOKEN_DTYPES)
    token_scale: str | None = option(None, "int8/fp8 scale per 'token' or per 'channel'.", default_text="token", one_of=TOKEN_SCALES)
    token_pca: int = option(0, "Store tokens as W PCA coordinates (basis fitted on train tokens; 0: off).", minimum=0)
    token_pca_sample: int = option(1024, "Train images whose tokens fit the PCA basis.", minimum=1)


@dataclass(frozen=True)
class TrainHeadConfig:
    """Stage 1: a head trained on a feature cache."""

    features: str = option(REQUIRED, "Feature cache folder from `ltclip extract`.", short="-f",
                           default_text="the one ./ltclip.toml names", input="cache")
    out: str = option(REQUIRED, _OUT_RUN, short="-o", default_text="runs/HEAD-LOSS-SAMPLER")
    recipe: str | None = option(None, "Named recipe (`ltclip list recipes`): its options are the defaults, any option given "
                                      "wins; the run records it.")
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    val_split: str = option("val", "Split for model selection.")
    max_ram: str | None = option(None, "Stream token caches larger than this, e.g. 8G.",
                                 default_text="half of the available memory, shared by the processes")
    read_blocks: int = option(0, "Block-shuffled read order for caches streamed from slow disks: contiguous blocks "
                                 "of this many rows, e.g. 1024 (0: the sampler's own order).", minimum=0)
    shuffle_pool: int | None = option(None, "Blocks shuffled together in the --read-blocks order.", default_text="16", minimum=1)
    posthoc_la: bool = option(False, "Post-hoc logit adjustment, tau chosen on val.")
    device: str = option("auto", _DEVICE, one_of=DEVICES)
    tensorboard: bool = option(False, "Also write TensorBoard scalars to RUN/tensorboard (needs tensorboard).")
    min_steps: int = option(0, f"Lengthen --epochs (at most {MAX_LENGTHENING}×) until the run takes this many optimizer steps (0: off).",
                            default_text="the head's, where no length is given", minimum=0)


@dataclass(frozen=True)
class SecondStageConfig:
    """A second stage on a finished stage-1 run; ``sampler``/``loss`` None mean the method's own."""

    from_run: str = option(REQUIRED, "Finished first-stage run: train a second stage on it.", flag="--from", input="run")
    out: str = option(REQUIRED, _OUT_RUN, short="-o", default_text="runs/STAGE1-METHOD")
    two_stage: str | None = option(None, "Second-stage method, with --from.", choices="two-stage")
    two_stage_opts: Options = option(Options(), "Second-stage option key=value (repeatable).", flag="--two-stage-opt",
                                             choices_of="two_stage")
    sampler: str | None = option(None, "Sampler.", choices="samplers", default_text="the method's")
    loss: str | None = option(None, "Loss.", choices="losses", default_text="the method's")
    loss_opts: Options = option(Options(), "Loss option key=value (repeatable), e.g. tau=1.", flag="--loss-opt", choices_of="loss")
    optim: OptimConfig = SECOND_STAGE_OPTIM
    features: str | None = option(None, "Feature cache folder (must be the first stage's).", short="-f",
                                  default_text="the first stage's", input="cache")
    val_split: str = option("val", "Split for model selection.")
    max_ram: str | None = option(None, "Stream token caches larger than this, e.g. 8G.",
                                 default_text="half of the available memory, shared by the processes")
    posthoc_la: bool = option(False, "Post-hoc logit adjustment, tau chosen on val.")
    device: str = option("auto", _DEVICE, one_of=DEVICES)
    tensorboard: bool = option(False, "Also write TensorBoard scalars to RUN/tensorboard (needs tensorboard).")


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end training on images: an open_clip encoder (tuned as ``tuning`` says) and a head."""

    out: str = option(REQUIRED, _OUT_RUN, short="-o", default_text="runs/finetune-TUNE-HEAD-LOSS-SAMPLER")
    recipe: str | None = option(None, "Named recipe (`ltclip list recipes`): its options are the defaults, any option given "
                                      "wins; the run records it.")
    data: DataConfig = DataConfig()
    model: str = option("ViT-B-16", "open_clip model name.", short="-m")
    pretrained: str = option("openai", "open_clip tag, checkpoint file, or 'none'.", short="-p", input="weights")
    preprocess_from: str | None = option(None, "Tag whose preprocessing a checkpoint file needs.")
    tuning: TuningConfig = TuningConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = FINETUNE_OPTIM
    augment: bool = option(True, "RandomResizedCrop + horizontal flip at every step.")
    train_crop: str = option("random", "random (RandomResizedCrop + horizontal flip) or mda (LIFT+'s: square crops, no flip, "
                                       "the smallest crop area growing per epoch from 0.08 to 1).", one_of=TRAIN_CROPS)
    interpolation: str | None = option("bilinear", "bilinear (LIFT's) or bicubic resampling of the training crops "
                                                 "and the --eval-resize validation views.", one_of=INTERPOLATIONS)
    eval_resize: int | None = option(None, "Validation images: resize the short side to this, then center-crop; "
                                           "0: the model's preprocessing. The run records the value, and `ltclip eval` "
                                           "views the test images the same way.",
                                     default_text="LIFT's: the resolution × 8/7, 256 at 224", minimum=0)
    normalize: str = option("model", "model (the model's mean/std) or imagenet (the seed code's).", one_of=NORMALIZATIONS)
    workers: int | None = option(None, _WORKERS, default_text=_WORKERS_DEFAULT, minimum=0)
    decode: str = option("cpu", "cpu (PIL in the DataLoader workers) or device (the workers read the files; JPEGs are decoded "
                                "and cropped on --device, other files decoded on the CPU).", one_of=DECODES)
    val_split: str = option("val", "Split for model selection.")
    device: str = option("auto", _DEVICE, one_of=DEVICES)
    tensorboard: bool = option(False, "Also write TensorBoard scalars to RUN/tensorboard (needs tensorboard).")


@dataclass(frozen=True)
class EvalConfig:
    """``ltclip eval``: shot-group metrics of runs and baselines, and the reports."""

    runs: tuple[str, ...] = ()  # the command's arguments
    features: str | None = option(None, "Cache folder for the baselines.", short="-f", default_text="the one ./ltclip.toml names",
                                  input="cache")
    split: str = option("test", "Split of each run's cache to evaluate.")
    zero_shot: bool = option(False, "Zero-shot CLIP with the cache's text embeddings.")
    knn: int = option(0, "kNN baseline with K neighbours from the train cache (0: off).", minimum=0)
    ncm: bool = option(False, "Nearest-class-mean baseline.")
    retrieval_mix: float = option(0.0, "Blend each run with kNN votes: weight alpha in [0, 1].", minimum=0, maximum=1)
    retrieval_k: int = option(10, "Neighbours for --retrieval-mix.", minimum=1)
    temperature: float = option(0.07, "kNN vote temperature.", above=0)
    views: str = option("mean", "Test views: mean (average logits) or first.", one_of=VIEW_POOLS)
    data_root: str | None = option(None, "Images of finetuned runs.", default_text="the run's own data root", input="folder")
    test_views: str = option("center", "Views of each image for finetuned runs: center, flip, fivecrop or tencrop.", one_of=TEST_VIEWS)
    eval_resize: int | None = option(None, "Finetuned runs: resize the short side to this before cropping the "
                                           "views, e.g. 248 with fivecrop (LIFT's tables); 0: the model's preprocessing.",
                                     default_text="the run's --eval-resize, else the model's preprocessing", minimum=0)
    interpolation: str | None = option(None, "Finetuned runs: bilinear or bicubic resampling of the --eval-resize views.",
                                       default_text="the run's --interpolation, else the model's", one_of=INTERPOLATIONS)
    workers: int | None = option(None, "Image decode workers for finetuned runs.", default_text=_WORKERS_DEFAULT, minimum=0)
    decode: str = option("cpu", "Finetuned runs: cpu (PIL in the DataLoader workers) or device (JPEGs decoded and cropped "
                                "on --device).", one_of=DECODES)
    many: int = option(100, "Classes with more training images than this are 'many'.", minimum=0)
    few: int = option(20, "Classes with fewer training images than this are 'few'.", minimum=0)
    backend: str = option("auto", "kNN search: auto, faiss or torch.", one_of=SEARCH_BACKENDS)
    batch_size: int | None = option(None, "Per forward pass: rows of a cache, or images of a finetuned run (each with its "
                                          "--test-views views).", default_text="1024 rows; 128 images (LIFT's test batch)",
                                    minimum=1)
    device: str = option("auto", _DEVICE, one_of=DEVICES)
    allow_mixed: bool = option(False, "Allow runs of different datasets in one report.")
    report: str | None = option(None, "Markdown table to write.")
    json: str | None = option(None, "JSON results to write.")
    csv: str | None = option(None, "CSV results to write.")
    plot: str | None = option(None, "PNG of accuracy by shot group per method; the per-class figure goes beside it "
                                     "(NAME_per_class.png).")


@dataclass(frozen=True)
class ReproduceConfig:
    """What ``ltclip reproduce`` was asked for; ``None`` leaves a value to the recipe or the command.

    The dataset fields are the dataset options' (``DataConfig``); the others are ``reproduce``'s own.
    """

    dataset: str
    data_root: str
    out: str = option(None, "Experiment folder: features/, runs/, the report.", short="-o",
                      default_text="experiments/DATASET-MODEL-PRETRAINED")
    model: str = option("ViT-L-14", "open_clip model name.", short="-m")
    pretrained: str = option("openai", "open_clip tag, checkpoint file, or 'none'.", short="-p", input="weights")
    recipe: str = option("imbalance-vlm", "Which table: imbalance-vlm (the paper's rows) or lift (LIFT's AdaptFormer row).")
    manifest_dir: str | None = None
    imbalance: float | None = None
    download: bool = False
    epochs: int | None = option(None, "Epochs of every training step.", default_text="the recipe's", minimum=1)
    steps: int | None = option(None, "Optimizer steps of every training step instead of epochs (smoke tests, budgets).", minimum=1)
    batch_size: int | None = option(None, "Batch of every training step.", default_text="the recipe's", minimum=1)
    precision: str | None = option(None, "fp32, fp16 or bf16 for extraction and training.", default_text="the commands'", one_of=ENCODE_PRECISIONS)
    device: str | None = option(None, _DEVICE, default_text="auto", one_of=DEVICES)
    workers: int | None = option(None, "Image decode workers of extract, finetune and their eval.", default_text="the commands'", minimum=0)
    launcher: str | None = option(None, "Run extract and training steps under this, e.g. 'torchrun --nproc_per_node=8'.")


__all__ = [
    "DataConfig", "EvalConfig", "ExtractConfig", "FINETUNE_OPTIM", "FinetuneConfig", "MethodConfig", "OptimConfig",
    "ReproduceConfig", "SECOND_STAGE_OPTIM", "SecondStageConfig", "TrainHeadConfig", "TuningConfig",
]
