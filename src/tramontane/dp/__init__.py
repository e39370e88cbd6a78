"""DP-SGD on any nn.Module: per-example gradient norms, clipping, Gaussian noise, Poisson sampling.

`DPEngine` clips every example's gradient in one backward pass (ghost norms / book-keeping) and adds the
Gaussian mechanism's noise; `PoissonSampler` draws the logical batches the accountants assume;
`validate_model` names the modules that cannot be trained privately. See `engine.py` for the contract.
"""

from tramontane.dp.engine import CLIP_EPS, DPEngine
from tramontane.dp.sampling import PoissonSampler, micro_batches
from tramontane.dp.validate import find_unsupported, validate_model

__all__ = ["CLIP_EPS", "DPEngine", "PoissonSampler", "find_unsupported", "micro_batches", "validate_model"]
