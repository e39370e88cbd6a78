"""One home per mechanism (STYLE.md, "One home per idea"), so that a second copy cannot come back unnoticed.

Every module under src/tramontane is parsed with `ast` (not imported), and:
- atomic writes: renaming into place, fsync and temporary folders (`os.replace`, `os.rename`, `os.fsync`,
  `os.fdatasync`, `tempfile.mkdtemp`, `tempfile.mkstemp`) appear in `tramontane/files.py` only;
- seeding: "no seed -> fresh entropy, else derive_seed(seed, label)" is written in `tramontane/seeding.py`
  only: no generator is seeded with `derive_seed(...)` elsewhere, and no conditional picks `derive_seed`;
- the analytic Gaussian calibration is defined in `tramontane/accounting/gaussian.py` only, and the TAN batch
  rule (the only caller of `eta_for_eps_tan`) in `tramontane/accounting/tan.py`.
The old import paths still give the same objects, and the helpers do what the callers relied on.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats

import tramontane
from tramontane import accounting, files, seeding

SRC = Path(tramontane.__file__).parent

ATOMIC_HOME = "tramontane/files.py"
SEEDING_HOME = "tramontane/seeding.py"
GAUSSIAN_HOME = "tramontane/accounting/gaussian.py"
TAN_HOME = "tramontane/accounting/tan.py"

ATOMIC_CALLS = {("os", "replace"), ("os", "rename"), ("os", "fsync"), ("os", "fdatasync"),
                ("tempfile", "mkdtemp"), ("tempfile", "mkstemp")}
SEEDED = {"default_rng", "Generator", "RandomState", "SeedSequence", "manual_seed", "seed", "SecureRandom"}
DEFINED_ONCE = {"derive_seed": SEEDING_HOME, "fsync_path": ATOMIC_HOME, "write_atomic": ATOMIC_HOME,
                "write_json_atomic": ATOMIC_HOME, "write_dir_atomic": ATOMIC_HOME, "_atomic_file": ATOMIC_HOME,
                "gaussian_delta": GAUSSIAN_HOME, "analytic_gaussian_sigma": GAUSSIAN_HOME,
                "gaussian_noise_for_epsilon": GAUSSIAN_HOME, "tan_batch_size": TAN_HOME}



@dataclass(frozen=True)
class Found:
    module: str
    line: int
    rule: str
    label: str  # the first string given to derive_seed, for the seeding rule

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.rule}" + (f" (label {self.label!r})" if self.label else "")


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _derive_seed_calls(*nodes: ast.AST) -> list[ast.Call]:
    return [n for node in nodes for n in ast.walk(node) if isinstance(n, ast.Call) and _name(n.func) == "derive_seed"]


def _label(calls: list[ast.Call]) -> str:
    for call in calls:
        for arg in call.args[1:]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return arg.value
    return ""


def _tests_seed_for_none(test: ast.expr) -> bool:
    """`seed is None` (or `self.noise_seed is not None`, `seed == None`, ...)."""
    return any(isinstance(n, ast.Compare) and "seed" in ast.unparse(n.left)
               and any(isinstance(c, ast.Constant) and c.value is None for c in n.comparators)
               for n in ast.walk(test))


def findings(source: str, module: str) -> list[Found]:
    """What `source` (the module `module`, e.g. "tramontane/x.py") does that only a mechanism's home may do."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module, from `import os [as o]`
    functions: dict[str, tuple[str, str]] = {}  # local name -> (module, name), from `from os import replace`
    found: set[Found] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "tempfile"):
            for alias in node.names:
                functions[alias.asname or alias.name] = (node.module, alias.name)
                if (node.module, alias.name) in ATOMIC_CALLS and module != ATOMIC_HOME:
                    found.add(Found(module, node.lineno, f"imports {node.module}.{alias.name}", ""))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            target = functions.get(func.id) if isinstance(func, ast.Name) else (
                (modules.get(func.value.id, ""), func.attr)
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None)
            if target in ATOMIC_CALLS and module != ATOMIC_HOME:
                found.add(Found(module, node.lineno, f"calls {target[0]}.{target[1]}", ""))
            seeded = _derive_seed_calls(*node.args, *(k.value for k in node.keywords))
            if _name(func) in SEEDED and seeded and module != SEEDING_HOME:
                found.add(Found(module, node.lineno, f"seeds {_name(func)} with derive_seed", _label(seeded)))
            if _name(func) == "eta_for_eps_tan" and module != TAN_HOME:
                found.add(Found(module, node.lineno, "applies the TAN rule itself (eta_for_eps_tan)", ""))
        elif isinstance(node, (ast.IfExp, ast.If)) and module != SEEDING_HOME:
            branches = [node.body, node.orelse] if isinstance(node, ast.IfExp) else [*node.body, *node.orelse]
            seeded = _derive_seed_calls(*branches)
            if seeded and _tests_seed_for_none(node.test):
                found.add(Found(module, node.lineno, "chooses between no seed and derive_seed", _label(seeded)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            home = DEFINED_ONCE.get(node.name)
            if home is not None and module != home:
                found.add(Found(module, node.lineno, f"defines {node.name} (its home is {home})", ""))
    return sorted(found, key=lambda f: (f.module, f.line, f.rule))


def all_findings() -> list[Found]:
    return [f for path in sorted(SRC.rglob("*.py"))
            for f in findings(path.read_text(), str(path.relative_to(SRC.parent)))]


# ------------------------------------------------------------------------------------------ the source tree


def test_no_mechanism_is_written_twice() -> None:
    found = all_findings()
    unexpected = [str(f) for f in found]
    assert not unexpected, "call the mechanism's home instead:\n" + "\n".join(unexpected)


def test_the_checker_finds_each_kind_of_copy() -> None:
    source = '''
import os as o
import tempfile
from os import fsync
import numpy as np
import torch
from tramontane.seeding import derive_seed

def save(tmp, path, seed):
    d = tempfile.mkdtemp(dir=path)
    o.replace(tmp, path)
    rng = np.random.default_rng(None if seed is None else derive_seed(seed, "pool"))
    gen = torch.Generator().manual_seed(derive_seed(seed, "noise"))
    if seed is None:
        s = None
    else:
        s = derive_seed(seed, "count")
    batch = eta_for_eps_tan(1.0, 1e-5) * 3 * n

def analytic_gaussian_sigma(epsilon, delta):
    return 1.0
'''
    rules = {(f.line, f.rule, f.label) for f in findings(source, "tramontane/elsewhere.py")}
    assert rules == {
        (4, "imports os.fsync", ""), (10, "calls tempfile.mkdtemp", ""), (11, "calls os.replace", ""),
        (12, "seeds default_rng with derive_seed", "pool"), (12, "chooses between no seed and derive_seed", "pool"),
        (13, "seeds manual_seed with derive_seed", "noise"), (14, "chooses between no seed and derive_seed", "count"),
        (18, "applies the TAN rule itself (eta_for_eps_tan)", ""),
        (20, f"defines analytic_gaussian_sigma (its home is {GAUSSIAN_HOME})", ""),
    }
    # each home may do its own thing
    assert not [f for f in findings(source, ATOMIC_HOME) if f.rule.startswith(("calls", "imports"))]
    assert not [f for f in findings(source, SEEDING_HOME) if "seed" in f.rule]
    assert not [f for f in findings(source.replace("seed is None", "path is None"), "tramontane/elsewhere.py")
                if f.rule.startswith("chooses")]  # only a test of the seed counts


def test_old_import_paths_give_the_one_home() -> None:
    from tramontane.audit import bounds
    from tramontane.dp import noise
    from tramontane.models import checkpoint
    from tramontane.synth import dp_schema
    from tramontane.training import state

    assert state.write_json_atomic is files.write_json_atomic
    assert checkpoint.fsync_path is files.fsync_path
    assert noise.derive_seed is seeding.derive_seed
    assert bounds.gaussian_noise_for_epsilon is accounting.analytic_gaussian_sigma
    assert dp_schema.analytic_gaussian_sigma is accounting.analytic_gaussian_sigma
    assert dp_schema.gaussian_delta is accounting.gaussian_delta


# ------------------------------------------------------------------------------------------------ seeding


def test_derived_seeds_are_pinned() -> None:
    # Values derive_seed gave before it moved: seeded runs stay bit-identical.
    assert seeding.derive_seed(9, "Poisson sampling") == 1821410517616418720
    assert seeding.derive_seed(0, "marginal pool") == 1111461669637114167
    assert seeding.derive_seed(123, "DP-SGD noise", "cpu", 7) == 8536636760160129234


def test_numpy_rng_seeds_as_the_callers_did() -> None:
    def draw(rng: np.random.Generator) -> list[int]:
        return rng.integers(2**62, size=4).tolist()

    assert draw(seeding.numpy_rng(5)) == draw(np.random.default_rng(5))  # a plain seed is used as given
    assert draw(seeding.numpy_rng(5, "pool")) == draw(np.random.default_rng(seeding.derive_seed(5, "pool")))
    assert draw(seeding.numpy_rng(5, "pool")) != draw(seeding.numpy_rng(5, "noise"))
    assert draw(seeding.numpy_rng(None)) != draw(seeding.numpy_rng(None))  # fresh entropy (2^-248 to fail)
    assert draw(seeding.numpy_rng(None, "pool")) != draw(seeding.numpy_rng(None, "pool"))


def test_torch_seeds_and_passed_on_seeds() -> None:
    assert seeding.seed_for(5, "noise", "cpu", 0) == seeding.derive_seed(5, "noise", "cpu", 0)
    fresh = {seeding.seed_for(None, "noise") for _ in range(8)}
    assert len(fresh) == 8 and all(0 <= s < 2**63 for s in fresh)
    assert seeding.derived_seed(None, "marginals") is None
    assert seeding.derived_seed(5, "marginals") == seeding.derive_seed(5, "marginals")


# ------------------------------------------------------------------------------------ analytic Gaussian, TAN


def _reference_sigma(epsilon: float, delta: float) -> float:
    """Balle and Wang's Theorem 8 solved with scipy, as audit/bounds.py did before the move."""
    def excess(log_sigma: float) -> float:
        s = math.exp(log_sigma)
        return float(stats.norm.cdf(1 / (2 * s) - epsilon * s)
                     - math.exp(epsilon) * stats.norm.cdf(-1 / (2 * s) - epsilon * s)) - delta

    return math.exp(optimize.brentq(excess, math.log(1e-3), math.log(1e4), xtol=1e-12))


@pytest.mark.parametrize("epsilon, delta", [(4.0, 1e-5), (0.5, 1e-6), (1.0, 0.01), (8.0, 1e-9), (0.05, 1e-5)])
def test_the_analytic_gaussian_is_the_reference_and_errs_towards_noise(epsilon: float, delta: float) -> None:
    sigma = accounting.analytic_gaussian_sigma(epsilon, delta)
    assert sigma == pytest.approx(_reference_sigma(epsilon, delta), rel=1e-9)
    assert accounting.gaussian_delta(sigma, epsilon) <= delta  # never less noise than needed...
    assert accounting.gaussian_delta(sigma * (1 - 1e-9), epsilon) > delta  # ...and not much more


@pytest.mark.parametrize("epsilon, delta", [(0.0, 1e-5), (-1.0, 1e-5), (math.inf, 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_the_analytic_gaussian_refuses_impossible_budgets(epsilon: float, delta: float) -> None:
    from tramontane.errors import PrivacyParameterError

    if epsilon == 0.0:  # allowed: pure delta
        assert accounting.gaussian_delta(accounting.analytic_gaussian_sigma(epsilon, delta), 0.0) <= delta
        return
    with pytest.raises(PrivacyParameterError):
        accounting.analytic_gaussian_sigma(epsilon, delta)


def test_the_tan_rule_is_the_papers_formula_and_plan_constant_tan_uses_it() -> None:
    n, eps, delta, steps, sigma = 50_000, 8.0, 1e-5, 2_500, 3.0
    eta = math.sqrt(math.log(1 / delta) + eps) - math.sqrt(math.log(1 / delta))  # eps_TAN inverted (Eq. 4)
    batch = accounting.tan_batch_size(n, eps, delta, steps, sigma)
    assert batch == pytest.approx(eta * sigma * math.sqrt(2 / steps) * n, rel=1e-12)
    assert accounting.eps_tan(accounting.eta(batch / n, sigma, steps), delta) == pytest.approx(eps, rel=1e-9)
    plan = accounting.plan_constant_tan(n, eps, delta, steps, noise_multiplier_guess=sigma, simulated_batch_size=None)
    assert plan.reference.batch_size == round(batch)
