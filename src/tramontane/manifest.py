"""Release manifests: each written field and why it may be released (DP, public or holder-only).

The vocabulary both the synthesizer (`tramontane.synth.release`, which holds a run's whole manifest) and the
reports (`tramontane.report.privacy_report.report_fields`, their JSON keys in these terms) speak, kept low
so that neither imports the other for it. Status of a field:
- `DP`: a function of the private rows only through mechanisms on the ledger; `source` names the ledger
  event labels (prefixes) it depends on;
- `PUBLIC`: a function of public inputs only; identical for any two neighbouring tables;
- `HOLDER`: computed from real rows without DP, for the data holder only, never in a shareable artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DP, PUBLIC, HOLDER = "dp", "public", "holder-only"
STATUSES = (DP, PUBLIC, HOLDER)


@dataclass(frozen=True)
class ReleasedField:
    """One field (or family of fields, `path` with `*` wildcards) of one artifact, and its status."""

    artifact: str
    path: str  # dotted JSON key path, lists as `[]`; "" for a whole file; a line pattern for stderr
    status: str
    source: tuple[str, ...] = ()  # DP: ledger labels it depends on; PUBLIC / HOLDER: empty
    meaning: str = ""

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        assert (self.status == DP) == bool(self.source), f"{self.artifact}:{self.path}: DP fields name a source"

    @property
    def shareable(self) -> bool:
        return self.status != HOLDER


def released_fields(artifact: str, status: str, source: tuple[str, ...],
                    entries: Mapping[str, str]) -> list[ReleasedField]:
    """One `ReleasedField` of `artifact` per (path, meaning) of `entries`, all with `status` and `source`."""
    return [ReleasedField(artifact, path, status, source, meaning) for path, meaning in entries.items()]
