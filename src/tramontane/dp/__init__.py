"""DP-SGD on any nn.Module: per-example gradient norms, clipping, Gaussian noise, Poisson sampling.

`DPEngine` clips every example's gradient in one backward pass (ghost norms / book-keeping) and adds the
Gaussian mechanism's noise; `DPEngine.step` is one whole DP-SGD step on an `Objective`; `PoissonSampler`
draws the logical batches the accountants assume; `validate_model` names the modules that cannot be trained
privately; `register_rule` teaches the engine a module type. See `engine.py` for the contract.

Importing this package registers the Mistral family's rules (`mistral.py`, the one module here that knows
`tramontane.models`), so an engine on a tramontane model always has them.
"""

from tramontane.dp import mistral as _mistral  # noqa: F401  (registers its rules)
from tramontane.dp.engine import CLIP_EPS, DPEngine, StepLosses
from tramontane.dp.objective import Objective
from tramontane.dp.rules import RoutingRule, Rule, register_rule
from tramontane.dp.sampling import PoissonSampler, micro_batches
from tramontane.dp.validate import find_unsupported, validate_model

__all__ = ["CLIP_EPS", "DPEngine", "Objective", "PoissonSampler", "RoutingRule", "Rule", "StepLosses",
           "find_unsupported", "micro_batches", "register_rule", "validate_model"]
