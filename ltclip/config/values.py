"""The fixed sets of values some options take, declared once: the config fields name them
(``option(..., one_of=TEST_VIEWS)``), so a wrong value is refused when the command line is read,
and the modules that act on a value import its set from here."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # cuda:N: the N-th visible GPU; auto: cuda when one is visible, else cpu
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16", "amp")  # amp: fp16 with a GradScaler on CUDA, fp32 elsewhere
ENCODE_PRECISIONS = ("fp32", "fp16", "bf16")  # a frozen encoder's autocast (extract, predict)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULE_UNITS = ("step", "epoch")
SUMMARY_KEYS = ("top1", "balanced_accuracy", "many", "medium", "few", "nll", "ece")  # the validation metrics
SELECT_LAST = "last"  # --select: keep the last epoch's weights (validation only logged)
TEST_VIEWS = ("center", "flip", "fivecrop", "tencrop")
INTERPOLATIONS = ("bilinear", "bicubic")
NORMALIZATIONS = ("model", "imagenet")
TRAIN_CROPS = ("random", "mda")
BAD_IMAGE_POLICIES = ("fail", "skip")
DECODES = ("cpu", "device")
TOKEN_DTYPES = ("float16", "int8", "fp8")
TOKEN_SCALES = ("token", "channel")
VIEW_POOLS = ("mean", "first")  # eval --views: average the views' logits, or take the first view's
SEARCH_BACKENDS = ("auto", "faiss", "torch")
EXPORT_FORMATS = ("torchscript", "export")
