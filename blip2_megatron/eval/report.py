"""Bookkeeping shared by the evaluation metrics, and the reports they end in.

* Result-set checks: every metric scores one prediction per ground-truth item and must
  refuse anything else (a duplicate, a lost sample, an id of another split), because
  such a mismatch changes the number silently. :func:`index_by_id` and
  :func:`check_ids_match` say exactly which ids are wrong.
* Files: :func:`save_metrics`, written atomically (``blip2_megatron.io``) so a crash or
  pre-emption never leaves a half-written result or metrics file.
* Console: :func:`format_metrics_table`, an aligned two-column table for logs.

Ids are matched by ``str(id)``: ``123`` and ``"123"`` name the same item (JSON round
trips and dataset code disagree on the type), ``"coco_123"`` stays what it is.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from blip2_megatron.io import write_json_atomic

# How many offending ids an error message lists before it says "and N more".
_IDS_SHOWN_IN_ERRORS = 5


def canonical_id(item_id: Hashable) -> str:
    """The key under which an image or question id is matched (``str(item_id)``)."""
    return str(item_id)


def sortable_id(item_id: Hashable) -> tuple[int, Any]:
    """A sort key that orders integer ids numerically and every other id as text, ints first."""
    if isinstance(item_id, numbers.Integral) and not isinstance(item_id, bool):
        return (0, int(item_id))
    return (1, str(item_id))


def _preview(ids: Iterable[Hashable]) -> str:
    """``coco_1, coco_2, 3 and 7 more``: a short, readable list of ids for an error message."""
    ids = sorted(ids, key=sortable_id)
    shown = ", ".join(str(i) for i in ids[:_IDS_SHOWN_IN_ERRORS])
    hidden = len(ids) - _IDS_SHOWN_IN_ERRORS
    return f"{shown} and {hidden} more" if hidden > 0 else shown


def index_by_id(records: Iterable[Mapping[str, Any]], key: str, what: str) -> dict[str, Mapping[str, Any]]:
    """Map ``canonical_id(record[key])`` to its record, refusing missing keys and duplicates.

    ``what`` names the records in error messages ("caption results", "VQA annotations").
    The returned dict keeps the input order.
    """
    indexed: dict[str, Mapping[str, Any]] = {}
    duplicates: list[Hashable] = []
    for position, record in enumerate(records):
        if not isinstance(record, Mapping) or key not in record:
            raise ValueError(f"{what}: entry {position} has no {key!r}: {record!r}")
        item_id = canonical_id(record[key])
        if item_id in indexed:
            duplicates.append(record[key])
        else:
            indexed[item_id] = record
    if duplicates:
        raise ValueError(
            f"{what}: {len(duplicates)} duplicate {key}(s): {_preview(duplicates)}; "
            "each item must appear exactly once (deduplicate distributed results with "
            "gather_results before scoring)"
        )
    return indexed


def check_ids_match(expected: Mapping[str, Any], found: Mapping[str, Any], what: str, key: str) -> None:
    """Raise a ValueError naming the missing and the extra ids unless both key sets are equal.

    Both mappings are keyed by :func:`canonical_id`; their values are only used to print
    the original ids.
    """
    missing = expected.keys() - found.keys()
    extra = found.keys() - expected.keys()
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} {key}(s) of the ground truth have no result: {_preview(missing)}")
    if extra:
        problems.append(f"{len(extra)} {key}(s) are not in the ground truth: {_preview(extra)}")
    raise ValueError(f"{what} do not cover the ground truth exactly: " + "; ".join(problems))


# ----------------------------------------------------------------------------- files


def save_metrics(metrics: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save a metrics dict as JSON (atomically; non-finite numbers become ``null``)."""
    return write_json_atomic(dict(metrics), path)


# ----------------------------------------------------------------------------- console


def _format_value(value: Any, precision: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.{precision}f}"
    return str(value)


def format_metrics_table(metrics: Mapping[str, Any], title: str = "metrics", precision: int = 4) -> str:
    """Render ``metrics`` as an aligned two-column table (name, value) under ``title``.

    Numbers are right-aligned, so their decimal points line up (``precision`` decimals
    for floats). Nested collections such as VQA's per-question scores are summarised as
    one row ("N values, not shown") so a table stays readable for a 200k-question split.
    """
    rows: list[tuple[str, str, bool]] = []  # (name, value text, right-align)
    for name, value in metrics.items():
        if isinstance(value, Mapping | Sequence) and not isinstance(value, str):
            rows.append((str(name), f"({len(value)} values, not shown)", False))
        else:
            rows.append((str(name), _format_value(value, precision), isinstance(value, numbers.Number)))
    if not rows:
        return f"{title}\n(no metrics)"
    name_width = max(len(name) for name, _, _ in rows)
    number_width = max((len(text) for _, text, is_number in rows if is_number), default=0)
    lines = [
        f"{name:<{name_width}}  {text.rjust(number_width) if is_number else text}".rstrip()
        for name, text, is_number in rows
    ]
    rule = "-" * max(len(title), *(len(line) for line in lines))
    return "\n".join([title, rule, *lines, rule])
