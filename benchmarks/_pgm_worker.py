"""Run one private-pgm baseline (AIM or MST via smartnoise-synth) on value ids; for benchmarks/synth.py.

Runs inside the baselines' own venv (`.bench/pgm-venv`), which has no tramontane:

    python _pgm_worker.py JOB_DIR

JOB_DIR/job.json: {"method", "epsilon", "delta", "seed", "n_values": [per column], "options": {...},
"sampler": "sample" | "round" | "both"} (plus the parent's "dataset" and "rows", unused here: the worker sees
only value ids, and the domain comes from `n_values`, the public schema's, whichever table it is)
JOB_DIR/train_ids.npy: int [N, d], each cell's category/bin id under the public schema.
Writes JOB_DIR/synthetic_ids.npy (int [N, d]; with "both", the "sample" rows, and the "round" rows from the
same fit in JOB_DIR/synthetic_ids_round.npy) and JOB_DIR/result.json (seconds, domain used, sampler).

The public domain is fixed, not learnt from the private rows: every column is a snsynth `LabelTransformer`
fitted on the public value ids 0 .. n_values-1 alone (so it is the identity map and its cardinality is the
schema's), and the already fitted `TableTransformer` is handed to `fit(transformer=...)`, which then neither
looks at the data to build the domain nor spends budget on preprocessing (preprocessor_eps=0).

Sampling (sampler "sample", the default): rows are drawn i.i.d. from the fitted model. snsynth's own
`AIMSynthesizer.sample` / `MSTSynthesizer.sample` call mbi's `MarkovRandomField.synthetic_data(rows)`, whose
default method in mbi 1.1.0 (the release smartnoise-synth 1.0.8 gets: it pins mbi<2) is "round": within a
group of rows that share their parents' values it hands out a child's values by the rows' position in the
group, without shuffling, so two columns sampled under the same parents come out co-monotone (every 1-way
marginal stays right; the 2- and 3-way ones do not). "sample" draws each child independently given its
parents. The worker asks for it through public attributes: the fitted mbi model snsynth keeps as
`synth.synthesizer`, `synthetic_data(rows, method="sample")` on it, then what snsynth's `sample` does next
(MST: `synth.undo_compress_fn`, which maps its compressed domain back; both: columns `col0..` in order and
the transformer's `inverse_transform`). Sampler "round" is snsynth's `sample()` unchanged: it is kept
only to reproduce the broken numbers; "both" samples both ways from one fit, which isolates the sampler
(snsynth draws its measurement noise from OpenDP's generator, which no seed reaches, so two fits differ).
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


SAMPLERS = ("sample", "round")


def sample_rows(synth, method: str, sampler: str, n: int, transformer, n_columns: int) -> np.ndarray:
    """n synthetic rows (int [n, d], public value ids) from a fitted snsynth AIM/MST synthesizer."""
    if sampler == "round":  # snsynth's own sample(): mbi 1.1's default "round" (co-monotone siblings)
        out = synth.sample(n)
    else:
        data = synth.synthesizer.synthetic_data(rows=n, method="sample")  # mbi MarkovRandomField, i.i.d.
        if method == "mst":
            data = synth.undo_compress_fn(data)  # MST's compressed domain back to the full one
        names = [f"col{j}" for j in range(n_columns)]  # snsynth's own column names, in transformer order
        out = transformer.inverse_transform([tuple(r) for r in data.df[names].to_numpy()])
    return np.asarray(pd.DataFrame(out).to_numpy(), dtype=np.int64)


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
    # numpy's global generator drives selection and sampling; the measurement noise is OpenDP's (unseeded)
    np.random.seed(job["seed"])
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
    sampler = job.get("sampler", "sample")
    if sampler not in (*SAMPLERS, "both"):
        raise ValueError(f"sampler must be one of {SAMPLERS} or 'both', got {sampler!r}")
    out = sample_rows(synth, job["method"], "sample" if sampler == "both" else sampler, len(df), transformer,
                      len(columns))
    sample_s = time.perf_counter() - start - fit_s
    assert out.shape == ids.shape, (out.shape, ids.shape)
    np.save(job_dir / "synthetic_ids.npy", out)
    if sampler == "both":  # the broken sampler on the same fitted model, for the comparison
        np.save(job_dir / "synthetic_ids_round.npy",
                sample_rows(synth, job["method"], "round", len(df), transformer, len(columns)))
    (job_dir / "result.json").write_text(json.dumps({
        "fit_seconds": fit_s, "sample_seconds": sample_s, "epsilon_used": float(synth.epsilon),
        "domain": transformer.cardinality, "sampler": sampler}))


if __name__ == "__main__":
    main(sys.argv[1])
