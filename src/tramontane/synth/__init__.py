"""DP synthetic tables (the synlm method, arXiv 2306.04803): public schema, row <-> token codec, sampler.

The public domain, `Schema`, lives below in `tramontane.tables.schema` (re-exported here and by the old
`synth.schema`); `dp_schema` infers it with DP, `codec` maps rows <-> token sequences and the constrained
likelihood, `sampling` samples under the constraints, and `synthesizer` holds `Synthesizer` (fit, sample,
save, load) and its training objective `RowObjective` (import it from there: it loads the training stack).
"""

from tramontane.synth.codec import IGNORE_INDEX, EncodedRows, TabularCodec
from tramontane.synth.dp_schema import ColumnSpend, SchemaInference, infer_schema
from tramontane.synth.sampling import sample_rows, sample_tokens
from tramontane.tables.schema import ColumnSpec, Schema

__all__ = [
    "IGNORE_INDEX",
    "ColumnSpec",
    "ColumnSpend",
    "EncodedRows",
    "Schema",
    "SchemaInference",
    "TabularCodec",
    "infer_schema",
    "sample_rows",
    "sample_tokens",
]
