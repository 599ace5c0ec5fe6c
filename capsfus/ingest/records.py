"""What a reader yields for a record it cannot use, in place of raising."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BadRecord:
    reason: str
    detail: str
    text: str  # what we could recover of the record, for the rejected file
