"""Run one private-pgm baseline (AIM or MST via smartnoise-synth) on value ids; for benchmarks/synth.py.

Runs inside the baselines' own venv (`.bench/pgm-venv`), which has no tramontane:

    python _pgm_worker.py JOB_DIR

JOB_DIR/job.json: {"method", "epsilon", "delta", "seed", "n_values": [per column], "options": {...}}
JOB_DIR/train_ids.npy: int [N, d], each cell's category/bin id under the public schema.
Writes JOB_DIR/synthetic_ids.npy (int [N, d]) and JOB_DIR/result.json (seconds, domain used).

The public domain is fixed, not learnt from the private rows: every column is a snsynth `LabelTransformer`
fitted on the public value ids 0 .. n_values-1 alone (so it is the identity map and its cardinality is the
schema's), and the already fitted `TableTransformer` is handed to `fit(transformer=...)`, which then neither
looks at the data to build the domain nor spends budget on preprocessing (preprocessor_eps=0).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def public_transformer(n_values: list[int]):
    """A fitted TableTransformer whose column j has exactly the ids 0..n_values[j]-1 (the public domain)."""
    from snsynth.transform.label import LabelTransformer
    from snsynth.transform.table import TableTransformer

    columns = [f"c{j}" for j in range(len(n_values))]
    width = max(n_values)
    domain = pd.DataFrame({c: np.arange(width) % k for c, k in zip(columns, n_values)})  # public, no rows
    transformer = TableTransformer([LabelTransformer(nullable=False) for _ in columns])
    transformer.fit(domain, epsilon=0.0)
    cards = transformer.cardinality
    assert cards == list(n_values), (cards, n_values)
    for t in transformer.transformers:  # identity: sorted ints 0..k-1 label to themselves
        assert list(t.categories) == list(range(len(t.categories)))
    return transformer, columns


class TimestampedLines:
    """A stdout wrapper that prefixes every line with the seconds since start, so a log shows AIM's pace."""

    def __init__(self, stream) -> None:
        self.stream, self.start, self.at_line_start = stream, time.perf_counter(), True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(f"[{time.perf_counter() - self.start:8.1f} s] ")
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def main(job_dir: str) -> None:
    from snsynth import Synthesizer

    sys.stdout = TimestampedLines(sys.stdout)

    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    ids = np.load(job_dir / "train_ids.npy")
    random.seed(job["seed"])
    np.random.seed(job["seed"])  # private-pgm draws its noise and samples from numpy's global generator
    transformer, columns = public_transformer(job["n_values"])
    df = pd.DataFrame(ids, columns=columns)

    start = time.perf_counter()
    options = dict(job.get("options", {}))
    if job["method"] == "aim":
        options.setdefault("verbose", True)  # one line per round: the selected marginal and budget used
    synth = Synthesizer.create(job["method"], epsilon=float(job["epsilon"]), delta=float(job["delta"]),
                               **options)
    synth.fit(df, transformer=transformer, categorical_columns=columns, preprocessor_eps=0.0)
    fit_s = time.perf_counter() - start
    out = synth.sample(len(df))
    sample_s = time.perf_counter() - start - fit_s
    out = np.asarray(pd.DataFrame(out, columns=columns).to_numpy(), dtype=np.int64)
    np.save(job_dir / "synthetic_ids.npy", out)
    (job_dir / "result.json").write_text(json.dumps({
        "fit_seconds": fit_s, "sample_seconds": sample_s, "epsilon_used": float(synth.epsilon),
        "domain": transformer.cardinality}))


if __name__ == "__main__":
    main(sys.argv[1])
