"""The synthesizer's two reports on a real tiny fit: the shareable release holds nothing computed from real
rows and says what it protects; the holder's evaluation is apart, private and labelled; both pages render
in headless Chromium with every image loaded and the key figures on screen."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from tramontane.datasets import adult_schema, load_adult
from tramontane.report.evaluation import EVALUATION_FIELDS, holder_evaluation
from tramontane.report.page import at_most, fmt, key_paths
from tramontane.report.privacy_report import write_reports
from tramontane.report.release import OPAQUE, RELEASE_FIELDS
from tramontane.synth.synthesizer import SynthConfig, Synthesizer

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

COLUMNS = ["age", "sex", "education", "income"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class ReleaseOnly:
    """A synthesizer seen through what the release may read: touching real-row results fails the test."""

    FORBIDDEN = ("diagnostics", "log_likelihood", "schema_inference", "fit", "sample")

    def __init__(self, synth: Synthesizer) -> None:
        self._synth = synth

    def __getattr__(self, name: str):
        if name in self.FORBIDDEN or name.startswith("_"):
            raise AssertionError(f"the release read Synthesizer.{name}")
        return getattr(self._synth, name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP warnings at q = 0.5
    data = load_adult("train")[COLUMNS]
    train, test = data.iloc[:600].reset_index(drop=True), load_adult("test")[COLUMNS].iloc[:300]
    config = SynthConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, steps=3, accountant="rdp")
    synth = Synthesizer(adult_schema().select(COLUMNS), epsilon=8.0, delta=1e-5, config=config, seed=0)
    synth.fit(train, test=test)
    synthetic = synth.sample(synth.summary.rows_dp, seed=0)
    directory = tmp_path_factory.mktemp("report")
    old = os.umask(0o022)
    try:
        paths = write_reports(directory, synth, train, synthetic, test, target="income")
    finally:
        os.umask(old)
    return synth, train, test, synthetic, directory, paths


def _load(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


def test_layout_and_permissions(run):
    *_, directory, paths = run
    assert paths.release_json == directory / "release" / "report.json"
    assert paths.evaluation_html == directory / "holder-only" / "evaluation.html"
    for path in (paths.release_json, paths.release_html):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    for path in (paths.evaluation_json, paths.evaluation_html):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "holder-only").stat().st_mode) == 0o700
    assert sorted(p.name for p in (directory / "release").iterdir()) == ["report.html", "report.json"]


def test_release_holds_only_dp_and_public_fields(run):
    synth, *_, paths = run
    release = _load(paths.release_json)
    registered = {f.path: f for f in RELEASE_FIELDS}
    found = key_paths(release, opaque=OPAQUE)
    assert found <= set(registered), f"unregistered release keys: {sorted(found - set(registered))}"
    assert not {p for p in found if registered[p].status == "holder-only"}
    optional = {p for p in registered if p.startswith("privacy.ledger.events[].")}
    assert set(registered) - optional <= found
    # the figures come from the DP summary and the ledger, never from the exact row counts
    s = synth.summary
    assert release["row_count"] == {"rows_dp": s.rows_dp, "noise_std": 20.0, "ledger_label": "row count"}
    assert release["summary"]["privacy_unit"] == "one row of the training table"
    assert release["summary"]["neighbouring_relation"] == "add or remove one row"
    assert release["schema"]["source"] == "public"
    assert [e["label"] for e in release["privacy"]["ledger"]["events"]] == ["row count", "synth dp-sgd", "marginals",
                                                                          "marginal selection"]
    assert release["dp_sgd"]["expected_batch_size"] == s.batch_size
    assert 0 < release["bounds"]["mi_advantage_bound"] < 1
    assert release["synthetic"]["rows"] == s.rows_dp
    text = paths.release_json.read_text() + paths.release_html.read_text()
    for point in synth.diagnostics.heldout_curve:
        assert repr(point["eval_loss"]) not in text


def test_release_reads_nothing_from_real_rows(run, tmp_path):
    """Built from a saved-and-loaded synthesizer that refuses real-row attributes, without real rows, the
    release is the same file."""
    synth, _, _, synthetic, directory, paths = run
    loaded = Synthesizer.load(synth.save(tmp_path / "model"))
    again = write_reports(tmp_path / "report", ReleaseOnly(loaded), None, synthetic)
    assert again.evaluation_json is None and again.evaluation_html is None
    assert not (tmp_path / "report" / "holder-only").exists()
    assert _load(again.release_json) == _load(paths.release_json)
    evaluation = holder_evaluation(loaded, run[1], synthetic)  # after load: no fit diagnostics
    assert evaluation["training"] is None and evaluation["utility"]["ml_efficacy"] is None


def test_release_page_words(run):
    *_, paths = run
    release, page = _load(paths.release_json), paths.release_html.read_text()
    for words in ("one row of the training table", "add or remove one row", "DP count", "not public",
                  f"({fmt(release['summary']['epsilon'], up=True)}, 1e-5)-differential privacy",
                  f"advantage at most {at_most(release['bounds']['mi_advantage_bound'])}",
                  f"DP count, {fmt(release['row_count']['rows_dp'])}", "ledger event &quot;row count&quot;"):
        assert words in page, words
    assert page.index("Summary") < page.index("Privacy ledger")
    assert "holder" not in page.split("<h2>Privacy guarantee")[1]


def test_evaluation_is_labelled_and_complete(run):
    synth, train, test, synthetic, _, paths = run
    evaluation = _load(paths.evaluation_json)
    assert key_paths(evaluation) == {f.path for f in EVALUATION_FIELDS}  # with a held-out table and a target
    assert "not covered by differential privacy" in evaluation["notice"]
    assert evaluation["training"]["rows_given"] == 600 == evaluation["utility"]["rows_real"]
    assert evaluation["training"]["heldout_curve"] == synth.diagnostics.heldout_curve
    u = evaluation["utility"]
    assert 0 <= u["tvd"]["2-way"] <= 1 and 0 <= u["tvd_real_test_vs_train"]["2-way"] <= 1
    assert u["heldout_nll_per_row"]["n"] == len(test)
    page = paths.evaluation_html.read_text()
    assert page.index("do not publish") < page.index("Utility summary") < page.index("Training")


def _chrome():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium "
                        "chromium-driver (.ci/run does)")
        pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get install chromium "
                    "chromium-driver)")
    if os.environ.get("CI"):
        import selenium  # noqa: F401  (a missing test extra fails in CI)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    # the system driver, named explicitly: Selenium Manager never downloads anything
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_pages_render_in_chromium(run, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")
    *_, paths = run
    release, evaluation = _load(paths.release_json), _load(paths.evaluation_json)
    u = evaluation["utility"]
    expected = {
        paths.release_html: (2, ["Summary", "one row of the training table", "add or remove one row",
                                 f"({fmt(release['summary']['epsilon'], up=True)}, 1e-5)",
                                 f"advantage at most {at_most(release['bounds']['mi_advantage_bound'])}",
                                 f"DP count, {fmt(release['row_count']['rows_dp'])}"]),
        paths.evaluation_html: (3, ["For the data holder only", "do not publish", fmt(u["tvd"]["2-way"]),
                                    fmt(u["heldout_nll_per_row"]["nll_per_row"]),
                                    fmt(evaluation["training"]["rows_used"])]),
    }
    driver = _chrome()
    try:
        for path, (n_images, words) in expected.items():
            driver.get(path.resolve().as_uri())
            images = driver.execute_script(
                "return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth]);")
            assert len(images) == n_images, images
            assert all(complete and width > 0 for _, complete, width in images), images
            text = driver.execute_script("return document.body.innerText;")
            for word in words:
                assert word in text, (path.name, word)
        top = driver.execute_script("return document.getElementById('banner').getBoundingClientRect().top;")
        assert top < 100  # the evaluation's banner is the first thing on screen
    finally:
        driver.quit()
