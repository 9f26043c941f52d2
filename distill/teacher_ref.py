"""`TeacherRef`: one teacher of an OPD run as the driver and the prompt allocation see it
(its own module so that both import it downward: distill.opd and distill.allocation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherRef:
    index: int
    name: str
    domain: str
    model_dir: str
    weight: float
    mode: str | None = None  # the reasoning mode it teaches (engine.modes); None: the whole domain
    share: float = 1.0  # its relative share of a round's prompts (distill.allocation)

    @property
    def route(self) -> str:
        """The samples it teaches: `domain`, or `domain@mode` (engine.modes.route_key)."""
        return self.domain if self.mode is None else f"{self.domain}@{self.mode}"
