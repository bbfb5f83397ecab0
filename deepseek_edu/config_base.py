"""What every config dataclass shares: the dict round trip and validated copies (`_ConfigDict`), and
the small checks each `validate` is written with.

A `validate` collects every broken rule with `_check` and raises one `ValueError` that names them all.
Used by `config.py` (`ModelConfig`, `TrainConfig`) and `grpo_config.py` (`GRPOConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self


def _is_int(value: Any) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float that is not a bool (NaN and infinities fail every range rule silently)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


class _ConfigDict:
    """Dict round trip and copies shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from a dict; unknown keys raise `ValueError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
