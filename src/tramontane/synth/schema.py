"""Moved to `tramontane.tables.schema`, below `synth/` and `report/`; this module keeps the old imports working."""

from tramontane.tables.schema import *
from tramontane.tables.schema import __all__  # noqa: F401
