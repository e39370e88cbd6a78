"""The reports' shared pieces: number wording (bounds never rounded down), key paths, the atomic write and
its permissions, the documented key table against the registries, and the summary's sentences."""

from __future__ import annotations

import os
import re
import stat

import pytest

from tramontane.report import privacy_report
from tramontane.report.evaluation import EVALUATION_FIELDS
from tramontane.files import write_atomic
from tramontane.report.page import at_most, fmt, key_paths, percent
from tramontane.report.release import RELEASE_FIELDS, statements


def test_numbers_read_as_people_write_them():
    assert fmt(1e-5) == "1e-5" and fmt(2.5e-7) == "2.5e-7"
    assert fmt(7.98765) == "7.99" and fmt(612) == "612" and fmt(12345) == "12,345"
    assert fmt(None) == "-" and fmt(True) == "yes" and fmt(float("nan")) == "n/a"
    # upper bounds round up: "epsilon 3" must never stand for 3.0004
    assert fmt(3.0004, up=True) == "3.01" and fmt(7.9996, up=True) == "8" and fmt(0.2301, up=True) == "0.231"
    assert at_most(0.2301) == "0.24" and at_most(0.23) == "0.23" and at_most(0.99999) == "1.00"
    assert percent(0.2345) == "23%" and percent(0.2345, up=True) == "24%"
    assert percent(0.0138) == "1.4%" and percent(0.0625, up=True) == "6.3%"
    assert percent(0.99998) == ">99.9%" and percent(0.99998, up=True) == "100%"


def test_key_paths():
    data = {"a": {"b": 1, "c": [{"d": 2}, {"e": None}]}, "f": [], "g": [1, 2], "h": {"x": {"y": 1}}}
    assert key_paths(data, opaque=["h"]) == {"a", "a.b", "a.c[]", "a.c[].d", "a.c[].e", "f[]", "g[]", "h"}


@pytest.mark.parametrize("umask, mode, expected", [(0o022, 0o666, 0o644), (0o077, 0o666, 0o600),
                                                   (0o022, 0o600, 0o600)])
def test_write_atomic_modes(tmp_path, umask, mode, expected):
    path = tmp_path / "report.json"
    path.write_text("old")
    os.chmod(path, 0o600 if expected != 0o600 else 0o644)
    old = os.umask(umask)
    try:
        write_atomic(path, "new", mode)
    finally:
        os.umask(old)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_documented_key_table_matches_the_registries():
    doc = privacy_report.__doc__
    release_doc, evaluation_doc = doc.split("release/report.json (")[1].split("holder-only/evaluation.json (")
    for text, fields in ((release_doc, RELEASE_FIELDS), (evaluation_doc, EVALUATION_FIELDS)):
        rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()
                if line.startswith("    ") and not line.strip().startswith("key path")]
        documented = [tuple(r) + ("",) * (3 - len(r)) for r in rows]
        assert documented == [(f.path, f.status, f.source) for f in fields]
    holder = [f for f in EVALUATION_FIELDS if f.path.startswith(("utility", "training"))]
    assert holder and all(f.status == "holder-only" for f in holder)
    assert not [f for f in RELEASE_FIELDS if f.status == "holder-only"]


def _report(source: str) -> dict:
    return {
        "summary": {"epsilon": 2.9991, "delta": 1e-5},
        "privacy": {"accountant": "rdp", "target_epsilon": 3.0},
        "bounds": {"mi_advantage_bound": 0.2301, "confidence_prior": 0.5, "confidence_fpr": 1e-3,
                   "confidence_bound": 0.81, "reconstruction": [
                       {"column": c, "values": m, "chance": 1 / m, "bound": b}
                       for c, m, b in [("age", 74, 0.05), ("sex", 2, 0.8), ("a", 3, 0.5), ("b", 4, 0.4),
                                       ("c", 5, 0.3), ("d", 6, 0.2), ("e", 7, 0.15)]]},
        "row_count": {"rows_dp": 32571, "noise_std": 20.0, "ledger_label": "row count"},
        "schema": {"source": source, "epsilon": 0.3, "delta": 1e-6},
    }


def test_summary_sentences():
    text = " ".join(statements(_report("public")))
    for words in ("privacy unit is one row of the training table", "add or remove one row",
                  "(3, 1e-5)-differential privacy", "advantage at most 0.24", "1 in 1,000",
                  "right at most 81%", "sex 80% (50%)", "1 more columns in the details",
                  "DP count, 32,571", "standard deviation 20", "given as a public input", "cost nothing"):
        assert words in text, words
    assert "epsilon 0.3 and delta 1e-6" in " ".join(statements(_report("dp")))
    assert any(s.startswith("WARNING") and "WITHOUT differential privacy" in s
               for s in statements(_report("non-private")))
