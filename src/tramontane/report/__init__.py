"""Utility metrics (`metrics`, `utility`) and the synthesizer's two reports (`privacy_report.write_reports`):
the shareable release (`release`: privacy guarantee, ledger, bounds, DP row count, schema; built from DP and
public figures only) and the data holder's evaluation against real rows (`evaluation`: not covered by DP,
never published). `page` holds what both pages share, `plots` their figures.

Import submodules directly (`from tramontane.report.metrics import marginal_tvd`): scikit-learn and
matplotlib are optional and only loaded by the functions that need them.
"""
