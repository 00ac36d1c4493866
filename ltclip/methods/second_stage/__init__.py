"""Second stages on a trained head: cRT, LWS, τ-normalisation, DisAlign, MARC, NCM, and post-hoc
logit adjustment (see :mod:`.methods` for each method's definition and reference)."""

from .base import TWO_STAGE, Calibrated, list_two_stage
from .fit import build_two_stage, fit_two_stage
from .posthoc import TAU_GRID, posthoc_logit_adjustment

__all__ = ["TAU_GRID", "TWO_STAGE", "Calibrated", "build_two_stage", "fit_two_stage", "list_two_stage",
           "posthoc_logit_adjustment"]
