"""DP synthetic tables (the synlm method, arXiv 2306.04803): public schema, row <-> token codec, sampler.

`schema` (the public domain), `dp_schema` (inferring it with DP), `codec` (rows <-> token sequences and the
constrained likelihood), `sampling` (constrained sampling from a trained model).
"""

from tramontane.synth.codec import IGNORE_INDEX, EncodedRows, TabularCodec
from tramontane.synth.dp_schema import ColumnSpend, SchemaInference, infer_schema
from tramontane.synth.sampling import sample_rows, sample_tokens
from tramontane.synth.schema import ColumnSpec, Schema

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
