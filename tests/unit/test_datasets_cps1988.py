"""The bundled CPS 1988 table: its split rebuilds the original file byte for byte, every row fits the public
schema with nothing clipped, the schema holds only documented values, the CLI and the synth benchmark take
it by name."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tramontane import datasets
from tramontane.cli import main
from tramontane.datasets import BUNDLED, bundled_table, cps1988_schema, load_cps1988

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "synth.py"
N_ROWS, N_TRAIN, N_TEST = 28_155, 18_770, 9_385
# sha256 of Rdatasets' csv/AER/CPS1988.csv, the file the split was made from (CPS1988_PROVENANCE.md)
ORIGINAL_SHA256 = "ef5ee9cbf3674f9cf242549517cf7801bffc5e98c1006055c9fdefebaf386251"
ORIGINAL_HEADER = "rownames,wage,education,experience,ethnicity,smsa,region,parttime"
# AER's documentation of CPS1988 (doc/AER/rst/CPS1988.rst)
DOCUMENTED_CATEGORIES = {"ethnicity": ("cauc", "afam"), "smsa": ("no", "yes"),
                         "region": ("northeast", "midwest", "south", "west"), "parttime": ("no", "yes")}


def _data_text(name: str) -> str:
    return (resources.files("tramontane") / "data" / name).read_text(encoding="utf-8")


def _split_lines(split: str) -> list[str]:
    """The shipped file's lines, header first, as stored (not re-formatted by pandas)."""
    raw = (resources.files("tramontane") / "data" / f"cps1988_{split}.csv.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


@pytest.fixture(scope="module")
def lines() -> dict[str, list[str]]:
    return {split: _split_lines(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {split: load_cps1988(split) for split in ("train", "test")}


def test_row_counts_and_columns(frames):
    assert len(frames["train"]) == N_TRAIN and len(frames["test"]) == N_TEST
    for df in frames.values():
        assert list(df.columns) == cps1988_schema().names
        assert not df.isna().any().any()


def test_the_split_rebuilds_the_original_file(lines):
    """Both splits put back at their seeded positions give the original CSV, byte for byte: together they
    hold every original row exactly once, and the split is the documented seed-0 permutation."""
    provenance = _data_text("CPS1988_PROVENANCE.md")
    assert ORIGINAL_SHA256 in provenance
    perm = np.random.default_rng(0).permutation(N_ROWS)
    positions = {"train": np.sort(perm[:N_TRAIN]), "test": np.sort(perm[N_TRAIN:])}
    rows: list[str | None] = [None] * N_ROWS
    for split, body in lines.items():
        assert body[0] == ORIGINAL_HEADER.split(",", 1)[1]
        assert len(body) - 1 == len(positions[split])
        for i, line in zip(positions[split], body[1:]):
            rows[i] = line
    assert all(r is not None for r in rows)
    original = "\n".join([ORIGINAL_HEADER] + [f"{i + 1},{r}" for i, r in enumerate(rows)]) + "\n"
    assert hashlib.sha256(original.encode("utf-8")).hexdigest() == ORIGINAL_SHA256


def test_the_splits_partition_the_rows_and_match_their_recorded_hashes(lines):
    """Disjoint as rows of the original (positions), not as values: the table repeats some rows verbatim
    (identical in all 7 columns), and a repeat may fall on both sides."""
    perm = np.random.default_rng(0).permutation(N_ROWS)
    train, test = set(perm[:N_TRAIN].tolist()), set(perm[N_TRAIN:].tolist())
    assert not train & test and train | test == set(range(N_ROWS))
    provenance = _data_text("CPS1988_PROVENANCE.md")
    for body in lines.values():
        digest = hashlib.sha256(("\n".join(body) + "\n").encode("utf-8")).hexdigest()
        assert digest in provenance


def test_every_row_fits_the_schema_with_nothing_clipped(frames):
    schema = cps1988_schema()
    for df in frames.values():
        schema.validate(df)
        for spec in schema.columns:  # in range as they are: clipping would change no id
            exact = spec.value_index(df[spec.name])
            assert (exact >= 0).all()
            assert (exact == spec.value_index(df[spec.name], clip=True)).all()
        conformed = schema.conform(df)
        assert len(conformed) == len(df)
        pd.testing.assert_frame_equal(conformed, df[schema.names], check_dtype=False)


def test_the_schema_holds_only_documented_values(frames):
    """Categories are AER's documented levels; ranges follow from the documented definitions (ages 18..70,
    CPS education 0..18, experience = age - education - 6), not from the rows' extremes."""
    schema = cps1988_schema()
    assert schema.private
    assert schema.names == ["wage", "education", "experience", "ethnicity", "smsa", "region", "parttime"]
    for name, cats in DOCUMENTED_CATEGORIES.items():
        assert schema[name].kind == "categorical" and schema[name].categories == cats
    education, experience, wage = schema["education"], schema["experience"], schema["wage"]
    assert (education.kind, education.lo, education.hi, education.n_bins) == ("integer", 0, 18, 19)
    assert (experience.kind, experience.lo, experience.hi) == ("integer", 18 - 18 - 6, 70 - 0 - 6)
    assert experience.n_bins == 71  # one bin per year
    assert (wage.kind, wage.lo, wage.hi, wage.n_bins) == ("float", 0.5, 200_000.0, 100)
    ratios = np.diff(np.log(wage.edges))  # log-spaced: every bin the same ratio wide
    assert ratios == pytest.approx(np.full(100, math.log(400_000) / 100), rel=1e-4)
    both = pd.concat(frames.values())
    for name in ("wage", "experience"):  # the rows' extremes are inside the range, not on it
        assert schema[name].lo < both[name].min() and both[name].max() < schema[name].hi


def test_registry_and_cli_resolve_the_bundled_names(frames):
    assert BUNDLED["cps1988"].target == "parttime" and BUNDLED["adult"].target == "income"
    assert bundled_table("cps1988") == (BUNDLED["cps1988"], "train")
    assert bundled_table("cps1988-train") == (BUNDLED["cps1988"], "train")
    assert bundled_table("cps1988-test") == (BUNDLED["cps1988"], "test")
    assert bundled_table("adult-test") == (BUNDLED["adult"], "test")
    assert bundled_table("cps1988.csv") is None and bundled_table("cps1988-valid") is None
    assert datasets.BUNDLED["cps1988"].schema() == cps1988_schema()


def test_cli_reads_cps1988_by_name(capsys):
    assert main(["evaluate", "--real-train", "cps1988", "--synthetic", "cps1988-test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["rows_real"], result["rows_synthetic"]) == (N_TRAIN, N_TEST)


def test_synth_benchmark_runs_on_cps1988(tmp_path):
    """The benchmark's quickest run on this table: the independent floor on 600 rows (a few seconds)."""
    cmd = [sys.executable, str(SCRIPT), "--dataset", "cps1988", "--rows", "600", "--epsilons", "10",
           "--methods", "independent", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["dataset"], summary["target"]) == ("cps1988", "parttime")
    assert (summary["rows"], summary["test_rows"]) == (600, N_TEST)
    floor = summary["results"]["10"]["independent"]
    assert 0 < floor["tvd2_schema"] < 1 and floor["hist_gbdt_auc"] is not None
    assert np.load(tmp_path / "independent-eps10" / "synthetic_ids.npy").shape == (600, 7)


def test_noschema_rows_are_scored_in_the_public_ids_or_counted():
    """tramontane-noschema's conversion: numbers outside the public range are clipped and counted, rows the
    public schema cannot hold are counted as unscorable, never scored silently."""
    spec = importlib.util.spec_from_file_location("bench_synth_cps", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    schema = cps1988_schema()
    rows = pd.DataFrame({"region": ["south", "south", "pacific"], "wage": [500.0, 1e7, 500.0],
                         "education": [12, 12, 12], "experience": [3, 3, 3], "ethnicity": ["cauc"] * 3,
                         "smsa": ["yes", "yes", "no"], "parttime": ["no"] * 3})
    ids, unscorable, clipped, by_column = bench.public_value_ids(schema, rows)
    assert (unscorable, clipped, by_column) == (1, 1, {"wage": 1})
    assert ids.shape == (2, 7)
    assert ids[1, schema.names.index("wage")] == schema["wage"].n_bins - 1  # clipped into the top bin
