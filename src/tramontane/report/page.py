"""What the reports share: the field registry (status, source, meaning of every JSON key path), number
formatting, the HTML page and its tables (files are written by `tramontane.files.write_atomic`).

A report's JSON keys are registered as `Field`s: the HTML shows each number with its registered one-line
meaning and source, and a test checks that the registry, the JSON actually written and the table in
`tramontane.report.privacy_report`'s docstring agree.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STATUSES = ("public", "dp", "schema", "holder-only")


@dataclass(frozen=True)
class Field:
    """One JSON key path of a report (dotted; `[]` for the items of a list).

    status: "public" (a public input: settings, constants), "dp" (computed from the ledger or from
    DP releases: post-processing), "schema" (public or dp as the schema's source says, non-private when it
    was read off the rows without DP) or "holder-only" (computed from real rows, not covered by DP).
    """

    path: str
    status: str
    source: str
    meaning: str
    label: str = ""  # the figure's name on the page (default: the last key, in words)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status


def registry(fields: Sequence[Field]) -> dict[str, Field]:
    out = {f.path: f for f in fields}
    assert len(out) == len(fields), "a key path is registered twice"
    return out


def key_paths(data: Any, prefix: str = "", opaque: Iterable[str] = ()) -> set[str]:
    """Every key path of a JSON object, dotted, a list's key written `key[]` (its items' keys below it);
    inner keys and leaves alike. Below a path in `opaque` (a mapping registered as a whole, such as a
    config) nothing is listed."""
    opaque = frozenset(opaque)
    out: set[str] = set()
    items = data if isinstance(data, list) else [data]
    for item in items:
        if not isinstance(item, Mapping):
            continue
        for key, value in item.items():
            path = (f"{prefix}.{key}" if prefix else str(key)) + ("[]" if isinstance(value, list) else "")
            out.add(path)
            if path not in opaque:
                out |= key_paths(value, path, opaque)
    return out


# -- numbers --------------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3, up: bool = False) -> str:
    """A number as people read it: `digits` significant digits (rounded up with `up`, for an upper bound
    such as epsilon), small numbers as 1e-5, whole numbers with thousands separators; anything else as
    text."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "infinite"
        if up and value > 0:
            scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
            value = math.ceil(value * scale * (1 - 1e-12)) / scale
        if value != 0 and abs(value) < 1e-3:
            mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def at_most(value: float, decimals: int = 2) -> str:
    """An upper bound rounded *up* (so that "at most 0.24" stays true of 0.2307)."""
    step = 10.0 ** -decimals
    return f"{min(1.0, math.ceil(value / step - 1e-9) * step):.{decimals}f}"


def percent(value: float, up: bool = False) -> str:
    """A probability as a percentage: whole percents from 10%, else 2 significant digits; rounded up when
    `up` (for bounds: 0.99998 is "at most 100%"), else 0.99998 shows as ">99.9%", never as "100%"."""
    p = 100 * value
    if 99.9 < p < 100 and not up:
        return ">99.9%"
    if p >= 10:
        return f"{math.ceil(p - 1e-9) if up else round(p):.0f}%"
    if p == 0:
        return "0%"
    scale = 10 ** (1 - math.floor(math.log10(p)))
    shown = (math.ceil(p * scale - 1e-9) if up else round(p * scale)) / scale
    return f"{shown:.{max(0, 1 - math.floor(math.log10(p)))}f}%"


# -- HTML -----------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.4em;width:100%}
td,th{border:1px solid #d6d6d6;padding:4px 8px;font-size:14px;vertical-align:top;text-align:left}
th{background:#f2f2f2}td.num{font-variant-numeric:tabular-nums;white-space:nowrap;text-align:right}
td.src{color:#555;font-size:12px;white-space:nowrap}
.summary{background:#f4f8fc;border:1px solid #b8cde3;border-radius:6px;padding:.4em 1.2em 1em}
.summary li{margin:.35em 0}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.6em .9em;border-radius:4px}
.banner{background:#b00020;color:#fff;font-weight:600;padding:.9em 1.1em;border-radius:6px;font-size:1.05em}
.lead{color:#444}figure{margin:1em 0}figcaption{color:#555;font-size:13px}img{max-width:100%}
"""


def esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else fmt(value))


def page(title: str, parts: Sequence[str]) -> str:
    """A whole self-contained HTML document (styles inline, images as data: URIs)."""
    head = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{CSS}</style></head>")
    return head + "<body>\n" + "\n".join(parts) + "\n</body></html>\n"


def table(rows: Iterable[Sequence[Any]], header: Sequence[str], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped (numbers formatted with `fmt`); columns in `numeric` align right."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = []
    for row in rows:
        cells = []
        for j, value in enumerate(row):
            cls = " class='num'" if j in numeric else ""
            cells.append(f"<td{cls}>{esc(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def figures_table(rows: Iterable[tuple[str, Any, str, str]]) -> str:
    """Rows of (figure, value, what it means, source)."""
    head = "<tr><th>figure</th><th>value</th><th>what it means</th><th>source</th></tr>"
    body = "".join(f"<tr><td>{esc(name)}</td><td class='num'>{esc(value)}</td><td>{esc(meaning)}</td>"
                   f"<td class='src'>{esc(source)}</td></tr>" for name, value, meaning, source in rows)
    return f"<table>{head}{body}</table>"


def field_rows(data: Mapping[str, Any], fields: Mapping[str, Field],
               paths: Sequence[str]) -> list[tuple[str, Any, str, str]]:
    """`figures_table` rows for key paths of `data`: label, value, registered meaning and source."""
    rows = []
    for path in paths:
        value: Any = data
        for key in path.split("."):
            value = value[key]
        f = fields[path]
        rows.append((f.label or path.rsplit(".", 1)[-1].replace("_", " "), value, f.meaning, f.source))
    return rows


def image(alt: str, png_base64: str, caption: str) -> str:
    return (f"<figure><img alt='{esc(alt)}' src='data:image/png;base64,{png_base64}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")
