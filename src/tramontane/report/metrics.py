"""Utility of a synthetic table against the real one: marginals, ML efficacy, likelihood, copies.

- `marginal_tvd`: mean total-variation distance over all 1-, 2- and 3-way marginals (the workload AIM and
  the synlm paper's baselines target). Numeric columns are cut into quantile bins fitted on the real
  training table (an atom such as capital-gain = 0 keeps a bin of its own); categorical values are
  compared as they are. Every k-way marginal is one `np.bincount` over mixed-radix codes.
- `ml_efficacy`: train on synthetic, test on real (TSTR) against train on real, with scikit-learn's
  HistGradientBoostingClassifier and a one-hot LogisticRegression: accuracy and ROC AUC.
- `nll_summary`: held-out negative log-likelihood per row, from per-row log-likelihoods the LM computes
  (`TabularCodec.sequence_log_likelihood`).
- `exact_match_rate`: share of synthetic rows identical to some training row (on the schema's binned
  representation when a schema is given): a memorisation smell, to compare with the same rate of held-out
  real rows.
- `independent_marginals_baseline`: rows whose columns are drawn independently from the (optionally
  Laplace-noised) 1-way marginals; a DP synthesizer that learnt anything must beat it on 2-way TVD.

Everything returns plain floats, dicts or dataclasses with `to_dict()`, all JSON-serialisable. Nothing here
logs or prints rows. scikit-learn is an optional dependency (`pip install tramontane[synth]`), imported
only by `ml_efficacy`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tramontane.errors import DataError, PrivacyParameterError, SchemaError
from tramontane.seeding import numpy_rng
from tramontane.tables.schema import Schema

DEFAULT_TVD_BINS = 20
_MAX_DENSE_CELLS = 1 << 24  # above this, a marginal is counted over its occupied cells only


def _check_frames(real: pd.DataFrame, synthetic: pd.DataFrame, what: str = "synthetic") -> list[str]:
    for name, df in (("real", real), (what, synthetic)):
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            raise DataError(f"the {name} table is empty")
    if set(real.columns) != set(synthetic.columns):
        only_real = [c for c in real.columns if c not in synthetic.columns]
        only_syn = [c for c in synthetic.columns if c not in real.columns]
        raise SchemaError(f"the tables' columns differ: only in real {only_real}, only in {what} {only_syn}")
    return list(real.columns)


def _is_numeric(series: pd.Series, name: str, schema: Schema | None) -> bool:
    if schema is not None and name in schema:
        return schema[name].is_numeric
    return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)


# -- discretisation -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MarginalBins:
    """Quantile cut points of numeric columns, fitted on the real training table."""

    cuts: dict[str, np.ndarray]  # column -> increasing interior cut points (bin i: cuts[i-1] <= x < cuts[i])

    @classmethod
    def fit(
        cls, df: pd.DataFrame, schema: Schema | None = None, n_bins: int = DEFAULT_TVD_BINS
    ) -> "MarginalBins":
        """Cut every numeric column at its n_bins-quantiles; a value repeated across quantiles (an atom)
        is isolated in a bin of its own."""
        if n_bins < 1:
            raise DataError(f"n_bins must be >= 1, got {n_bins}")
        cuts = {}
        for name in df.columns:
            if not _is_numeric(df[name], name, schema):
                continue
            x = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            x = x[~np.isnan(x)]
            if len(x) == 0:
                cuts[name] = np.zeros(0)
                continue
            q = np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1], method="inverted_cdf")
            values, repeats = np.unique(q, return_counts=True)
            # x < cut goes left: a cut at the atom a opens its bin, a cut just above a closes it.
            atoms = values[repeats > 1]
            c = np.unique(np.concatenate([values, np.nextafter(atoms, np.inf), [x.min()]]))
            cuts[name] = c[c > x.min()] if len(c) > 1 else c
        return cls(cuts)

    def codes(self, series: pd.Series, name: str) -> np.ndarray:
        """Bin of every value (int64); NaN gets the code after the last bin."""
        cuts = self.cuts[name]
        x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.searchsorted(cuts, x, side="right").astype(np.int64)
        out[np.isnan(x)] = len(cuts) + 1
        return out


def _joint_codes(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """Categorical codes over the union of both tables' values (missing: a code of its own)."""
    both = pd.concat([a.astype(object), b.astype(object)], ignore_index=True)
    codes, uniques = pd.factorize(both, use_na_sentinel=True)
    size = len(uniques) + 1
    codes = np.where(codes < 0, len(uniques), codes).astype(np.int64)
    return codes[: len(a)], codes[len(a):], size


def table_codes(
    real: pd.DataFrame, other: pd.DataFrame, columns: list[str], bins: MarginalBins
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ra, sa, sizes = [], [], []
    for name in columns:
        if name in bins.cuts:
            r, s = bins.codes(real[name], name), bins.codes(other[name], name)
            size = len(bins.cuts[name]) + 2
        else:
            r, s, size = _joint_codes(real[name], other[name])
        ra.append(r)
        sa.append(s)
        sizes.append(size)
    return np.stack(ra, axis=1), np.stack(sa, axis=1), np.asarray(sizes, dtype=np.int64)


# -- marginal TVD -------------------------------------------------------------------------------------------

@dataclass
class MarginalTVD:
    """Total-variation distances between real and synthetic k-way marginals (0: equal, 1: disjoint)."""

    mean: dict[int, float]  # k -> mean TVD over all k-way marginals
    max: dict[int, float]
    count: dict[int, int]
    per_marginal: dict[int, dict[str, float]] = field(repr=False)  # k -> {"a | b": tvd}
    n_bins: int = DEFAULT_TVD_BINS

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("mean", "max", "count", "per_marginal"):
            out[key] = {str(k): v for k, v in out[key].items()}
        return out


def _tvd(a: np.ndarray, b: np.ndarray, size: int) -> float:
    if size <= _MAX_DENSE_CELLS:
        p = np.bincount(a, minlength=size) / len(a)
        q = np.bincount(b, minlength=size) / len(b)
        return float(0.5 * np.abs(p - q).sum())
    cells, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    return _tvd(inverse[: len(a)], inverse[len(a):], len(cells))


def marginal_tvd(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    *,
    schema: Schema | None = None,
    bins: MarginalBins | None = None,
    n_bins: int = DEFAULT_TVD_BINS,
    orders: Sequence[int] = (1, 2, 3),
) -> MarginalTVD:
    """TVD between every k-way marginal of `real` and `synthetic`, for k in `orders`.

    bins: numeric cut points (default: fitted on `real` with `n_bins` quantile bins; when `real` is a
    held-out table, pass `MarginalBins.fit(train)` so the bins come from the training table). The schema, if
    given, decides which columns are numeric (else the dtype does).
    """
    columns = _check_frames(real, synthetic)
    bins = bins if bins is not None else MarginalBins.fit(real, schema, n_bins)
    missing = [c for c in columns if _is_numeric(real[c], c, schema) and c not in bins.cuts]
    if missing:
        raise DataError(
            f"bins have no cut points for numeric column(s) {missing}: fit them on a table that has them"
        )
    r, s, sizes = table_codes(real, synthetic, columns, bins)
    mean, worst, count, per = {}, {}, {}, {}
    for k in orders:
        if not 1 <= k <= len(columns):
            raise DataError(f"marginal order {k} is not between 1 and the number of columns ({len(columns)})")
        values = {}
        for combo in itertools.combinations(range(len(columns)), k):
            idx = list(combo)
            strides = np.cumprod(np.concatenate([[1], sizes[idx][::-1][:-1]]))[::-1]
            total = int(np.prod(sizes[idx].astype(np.float64)))
            if total < 2**62:
                ra, sa = r[:, idx] @ strides, s[:, idx] @ strides
            else:  # too many cells for one int64 code: count the occupied ones
                _, inv = np.unique(np.concatenate([r[:, idx], s[:, idx]]), axis=0, return_inverse=True)
                inv = inv.ravel()
                ra, sa, total = inv[: len(r)], inv[len(r):], int(inv.max()) + 1
            values[" | ".join(columns[i] for i in combo)] = _tvd(ra, sa, total)
        arr = np.fromiter(values.values(), dtype=np.float64)
        mean[k], worst[k], count[k], per[k] = float(arr.mean()), float(arr.max()), len(arr), values
    return MarginalTVD(mean, worst, count, per, n_bins)


# -- ML efficacy --------------------------------------------------------------------------------------------

@dataclass
class ClassifierScores:
    accuracy: float
    roc_auc: float | None  # None for a multi-class target


@dataclass
class MLEfficacy:
    """Test-set scores of classifiers trained on the real training table and on the synthetic one."""

    target: str
    positive: str | None
    scores: dict[str, dict[str, ClassifierScores]]  # model -> {"real": ..., "synthetic": ...}
    majority_accuracy: float  # predicting the training table's most frequent class
    n_train: int
    n_synthetic: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODELS = ("hist_gbdt", "logistic")
_MISSING = "__missing__"


def _labels(series: pd.Series) -> np.ndarray:
    return np.asarray([_MISSING if pd.isna(v) else str(v) for v in series], dtype=object)


def _features(df: pd.DataFrame, categorical: list[str], numeric: list[str]) -> pd.DataFrame:
    out = {}
    for c in numeric:
        out[c] = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    for c in categorical:
        out[c] = _labels(df[c])
    return pd.DataFrame(out, columns=numeric + categorical)


def _make_model(kind: str, numeric: list[str], categorical: list[str], train_x: pd.DataFrame,
                seed: int) -> Any:  # an unfitted sklearn Pipeline
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    if kind == "hist_gbdt":
        enc = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1, dtype=np.float64)
        pre = ColumnTransformer([("num", "passthrough", numeric), ("cat", enc, categorical)])
        # Categorical support needs fewer than 255 categories; wider columns are used as ordinal numbers.
        is_cat = [False] * len(numeric) + [train_x[c].nunique() < 250 for c in categorical]
        clf = HistGradientBoostingClassifier(categorical_features=is_cat or None, random_state=seed)
        return Pipeline([("pre", pre), ("clf", clf)])
    if kind == "logistic":
        num = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
        onehot = OneHotEncoder(handle_unknown="ignore")
        pre = ColumnTransformer([("num", num, numeric), ("cat", onehot, categorical)])
        return Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=2000))])
    raise DataError(f"unknown model {kind!r}; choose from {list(MODELS)}")


def _scores(model: Any, x_test: pd.DataFrame, y_test: np.ndarray, classes: list[str],
            positive: str | None) -> ClassifierScores:
    from sklearn.metrics import roc_auc_score

    pred = model.predict(x_test)
    accuracy = float(np.mean(pred == y_test))
    if positive is None:
        return ClassifierScores(accuracy, None)
    model_classes = list(model.classes_) if hasattr(model, "classes_") else classes
    if positive not in model_classes:
        score = np.zeros(len(y_test))
    else:
        score = model.predict_proba(x_test)[:, model_classes.index(positive)]
    y = (y_test == positive).astype(int)
    return ClassifierScores(accuracy, float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None)


class _Constant:
    """Fallback when a training table holds a single class: always predicts it."""

    def __init__(self, label: str) -> None:
        self.classes_ = [label]
        self.label = label

    def predict(self, x: pd.DataFrame) -> np.ndarray:
        return np.full(len(x), self.label, dtype=object)

    def predict_proba(self, x: pd.DataFrame) -> np.ndarray:
        return np.ones((len(x), 1))


def ml_efficacy(
    train: pd.DataFrame,
    synthetic: pd.DataFrame,
    test: pd.DataFrame,
    target: str,
    *,
    schema: Schema | None = None,
    models: Sequence[str] = MODELS,
    positive: str | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> MLEfficacy:
    """Train each model on `train` (real) and on `synthetic`, score both on `test` (real, held out).

    Binary targets also get ROC AUC for the class `positive` (default: the schema's last category of the
    target, else the last class in sorted order). A synthetic table with a single class yields a constant
    predictor (AUC 0.5). threads: cap on the BLAS/OpenMP threads the models use (HistGradientBoosting's
    OpenMP loops slow down badly on an oversubscribed machine; 1 is a safe choice there).
    """
    if threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            return ml_efficacy(train, synthetic, test, target, schema=schema, models=models,
                               positive=positive, seed=seed)
    columns = _check_frames(train, synthetic)
    _check_frames(train, test, "test")
    if target not in columns:
        raise SchemaError(f"target {target!r} is not a column; columns: {columns}")
    features = [c for c in columns if c != target]
    numeric = [c for c in features if _is_numeric(train[c], c, schema)]
    categorical = [c for c in features if c not in numeric]
    y_train, y_syn, y_test = (_labels(df[target]) for df in (train, synthetic, test))
    classes = sorted(set(y_train) | set(y_test))
    if positive is None and len(classes) == 2:
        if schema is not None and target in schema and schema[target].kind == "categorical":
            order = [str(c) for c in schema[target].categories if str(c) in classes]
            positive = order[-1] if order else classes[-1]
        else:
            positive = classes[-1]
    if len(classes) != 2:
        positive = None
    x_train, x_syn, x_test = (_features(df, categorical, numeric) for df in (train, synthetic, test))
    values, counts = np.unique(y_train, return_counts=True)
    majority = float(np.mean(y_test == values[np.argmax(counts)]))
    scores: dict[str, dict[str, ClassifierScores]] = {}
    for kind in models:
        scores[kind] = {}
        for source, x, y in (("real", x_train, y_train), ("synthetic", x_syn, y_syn)):
            if len(set(y)) < 2:
                model = _Constant(y[0])
            else:
                model = _make_model(kind, numeric, categorical, x, seed)
                model.fit(x, y)
            scores[kind][source] = _scores(model, x_test, y_test, classes, positive)
    return MLEfficacy(target, positive, scores, majority, len(train), len(synthetic), len(test))


# -- likelihood, copies, baseline ---------------------------------------------------------------------------

def nll_summary(log_likelihoods: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean negative log-likelihood per row (nats; also bits) with its standard error, from per-row
    log-likelihoods (e.g. `TabularCodec.sequence_log_likelihood` on held-out rows)."""
    ll = np.asarray(log_likelihoods, dtype=np.float64).ravel()
    if len(ll) == 0:
        raise DataError("no log-likelihoods given")
    if not np.isfinite(ll).all():
        raise DataError(
            "log-likelihoods must be finite (a -inf means a row the model gives zero probability)"
        )
    nll = -ll
    stderr = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    mean = float(nll.mean())
    return {"nll_per_row": mean, "stderr": stderr, "nll_per_row_bits": mean / math.log(2), "n": int(len(nll))}


def _schema_codes(df: pd.DataFrame, schema: Schema, unknown: int) -> np.ndarray:
    schema.check_columns(df)
    cols = []
    for spec in schema.columns:
        ids = spec.value_index(df[spec.name], clip=True)
        cols.append(np.where(ids < 0, unknown, ids))
    return np.stack(cols, axis=1)


def exact_match_rate(rows: pd.DataFrame, reference: pd.DataFrame, schema: Schema | None = None) -> float:
    """Share of `rows` identical to at least one row of `reference`.

    With a schema, rows are compared on its value ids (numbers by bin, clipped into range: a decoded
    synthetic value matches every training value of its bin); values outside the schema never match.
    Without one, values are compared as they are.
    """
    columns = _check_frames(reference, rows, "rows")
    if schema is not None:
        a, b = _schema_codes(rows, schema, -1), _schema_codes(reference, schema, -2)
    else:
        pairs = [_joint_codes(rows[c], reference[c]) for c in columns]
        a = np.stack([p[0] for p in pairs], axis=1)
        b = np.stack([p[1] for p in pairs], axis=1)
    a = np.ascontiguousarray(a, dtype=np.int64)
    b = np.ascontiguousarray(b, dtype=np.int64)
    seen = set(b.view(f"V{b.shape[1] * 8}").ravel().tolist())
    keys = a.view(f"V{a.shape[1] * 8}").ravel().tolist()
    return float(np.mean([k in seen for k in keys]))


def independent_marginals_baseline(
    df: pd.DataFrame,
    schema: Schema,
    n: int,
    rng: np.random.Generator | None = None,
    *,
    epsilon: float | None = None,
) -> pd.DataFrame:
    """n rows whose columns are independent draws from `df`'s 1-way marginals over the schema's values.

    With `epsilon`, Laplace noise of scale d/epsilon is added to every cell of the d histograms before
    they are clipped at 0 and normalised: one row moves one cell per column, so the d histograms have L1
    sensitivity d and the release is epsilon-DP (the cells come from the public schema: no threshold). Rows
    outside the schema are conformed first (`Schema.conform`, row by row). Numbers come back as bin values.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyParameterError(f"epsilon must be a positive finite number, got {epsilon!r}")
    rng = rng if rng is not None else numpy_rng(None)
    fitted = schema.conform(df)
    if len(fitted) == 0:
        raise DataError("no row fits the schema: nothing to take marginals from")
    vids = schema.value_ids(fitted)
    d = len(schema)
    out = np.empty((n, d), dtype=np.int64)
    for j, spec in enumerate(schema.columns):
        hist = np.bincount(vids[:, j], minlength=spec.n_values).astype(np.float64)
        if epsilon is not None:
            hist = np.clip(hist + rng.laplace(0.0, d / epsilon, size=len(hist)), 0.0, None)
        p = hist / hist.sum() if hist.sum() > 0 else np.full(len(hist), 1.0 / len(hist))
        out[:, j] = rng.choice(spec.n_values, size=n, p=p)
    return schema.frame_from_value_ids(out)
