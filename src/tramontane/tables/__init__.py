"""Tables: the public schema of a table (its domain: columns, allowed values, bins), below `synth/` and
`report/`, which both read it, as private-pgm keeps its `Domain` at the bottom.

`schema` holds `Schema` and `ColumnSpec`. Nothing here reads private rows beyond checking them against the
schema, and nothing here imports the synthesizer, the reports, DP or the models.
"""

from tramontane.tables.schema import ColumnSpec, Schema

__all__ = ["ColumnSpec", "Schema"]
