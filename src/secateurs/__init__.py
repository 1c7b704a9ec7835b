"""secateurs: structured pruning of Hugging Face causal LMs, with honest numbers."""

__version__ = "0.1.0"

from secateurs.api import CriterionSpec, PruneResult, ScoreResult, prune, score_units  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.evaluate import PPLProtocol, perplexity  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.plan import Plan  # noqa: E402
from secateurs.surgery import apply_plan  # noqa: E402

__all__ = [
    "CalibrationConfig",
    "CriterionSpec",
    "PPLProtocol",
    "Plan",
    "PruneResult",
    "ScoreResult",
    "apply_plan",
    "load_model",
    "perplexity",
    "prune",
    "score_units",
]
