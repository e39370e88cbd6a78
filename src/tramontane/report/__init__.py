"""Utility metrics (`metrics`) and the privacy report of a synthetic table.

Import submodules directly (`from tramontane.report.metrics import marginal_tvd`): scikit-learn and
matplotlib are optional and only loaded by the functions that need them.
"""
