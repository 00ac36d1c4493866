"""Stage configs (:mod:`.sections`), each option declared once on its field (:mod:`.fields`), and
their conversions to and from option values and files (:mod:`.files`). How the values a stage runs
with are chosen (options, ``--config``, ``--recipe``, method defaults) is :mod:`ltclip.recipes.resolve`."""

from .fields import REQUIRED, Options, OptionSpec, flags_of, option, option_fields, option_spec
from .files import flag, flatten, from_dict, from_flat, load_config_file, option_names, provenance, to_dict
from .predict import ExportConfig, PredictConfig
from .sections import (
    FINETUNE_OPTIM, SECOND_STAGE_OPTIM, DataConfig, EvalConfig, ExtractConfig, FinetuneConfig, MethodConfig, OptimConfig,
    ReproduceConfig, SecondStageConfig, TrainHeadConfig, TuningConfig,
)

__all__ = [
    "DataConfig", "EvalConfig", "ExportConfig", "ExtractConfig", "FINETUNE_OPTIM", "FinetuneConfig", "MethodConfig", "OptimConfig",
    "OptionSpec", "Options", "PredictConfig", "REQUIRED", "ReproduceConfig", "SECOND_STAGE_OPTIM", "SecondStageConfig", "TrainHeadConfig", "TuningConfig", "flag",
    "flags_of", "flatten", "from_dict", "from_flat", "load_config_file", "option", "option_fields", "option_names", "option_spec", "provenance", "to_dict",
]
