"""`Settings`: the base of every config section (the stage settings and the experiment schema).

Every section forbids unknown keys, is frozen once loaded, takes no inf or nan in any
float (`lr: .inf` is a config error, not a run that diverges at its first step) and no
boolean where a number is expected (pydantic would read `steps: true` as 1).
`registry_name(kind, names)` checks a field against a registry's names; the names of the
registries that live in torch modules are listed torch-free next to their settings
(tests/unit/test_config.py holds each list equal to its registry), so that `validate`
needs no torch.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation) if not isinstance(a, (str, int, float)))


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and info.field_name is not None \
                and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"a boolean ({value!r}) where {_type_name(cls.model_fields[info.field_name].annotation)}"
                             " is expected")
        return value


def registry_name(kind: str, names: tuple[str, ...]) -> AfterValidator:
    """A validator: the value is one of `names`, else "unknown <kind> 'x'; known: [...]"."""
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; known: {sorted(names)}")
        return value

    return AfterValidator(check)
