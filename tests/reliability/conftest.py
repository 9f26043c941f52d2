"""Reliability suite bookkeeping: every injected fault is recorded, and the run ends with a
table of faults injected, how each was handled, and data lost (which must be 0).

A test asks for the `fault_log` fixture and calls it once per fault it injects:

    fault_log("sigkill during teacher cache write", "recovered")
    fault_log("bit flip in model.safetensors", "detected")

Outcomes: `recovered` (the run continued and ended where an uninterrupted one ends),
`detected` (refused with an error naming what failed, before anything trained on it),
`contained` (hostile input scored or rejected without an exception, in bounded time),
`undetected` (a real gap: the test is an xfail and the gap is in the README/report).
`data_lost` counts samples, steps or checkpoints lost to the fault (must stay 0).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest

OUTCOMES = ("recovered", "detected", "contained", "undetected")


@dataclasses.dataclass(frozen=True)
class FaultRecord:
    area: str
    fault: str
    outcome: str
    data_lost: int


_RECORDS: list[FaultRecord] = []


def _area(nodeid: str) -> str:
    name = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return name.removeprefix("test_").removesuffix(".py")


@pytest.fixture
def fault_log(request):
    """`fault_log(fault, outcome, data_lost=0)`: record one injected fault of this test."""
    area = _area(request.node.nodeid)

    def record(fault: str, outcome: str, data_lost: int = 0) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"fault_log: outcome {outcome!r}; known: {OUTCOMES}")
        if data_lost < 0:
            raise ValueError(f"fault_log: data_lost must be >= 0, got {data_lost}")
        _RECORDS.append(FaultRecord(area, fault, outcome, int(data_lost)))

    return record


def summary_rows(records: list[FaultRecord]) -> list[tuple]:
    """(area, injected, recovered, detected, contained, undetected, data lost) per area + total."""
    by_area: OrderedDict[str, list[FaultRecord]] = OrderedDict()
    for r in sorted(records, key=lambda r: r.area):
        by_area.setdefault(r.area, []).append(r)

    def row(name, recs):
        return (name, len(recs), *(sum(r.outcome == o for r in recs) for o in OUTCOMES),
                sum(r.data_lost for r in recs))

    return [row(a, recs) for a, recs in by_area.items()] + [row("TOTAL", records)]


def format_table(rows: list[tuple]) -> list[str]:
    head = ("area", "injected", *OUTCOMES, "data lost")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    return [fmt(head), rule, *(fmt(r) for r in rows[:-1]), rule, fmt(rows[-1])]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    tr = terminalreporter
    tr.section("reliability summary: faults injected and how they were handled")
    for line in format_table(summary_rows(_RECORDS)):
        tr.write_line(line)
    gaps = [r for r in _RECORDS if r.outcome == "undetected"]
    for r in gaps:
        tr.write_line(f"GAP ({r.area}): {r.fault}")
    lost = sum(r.data_lost for r in _RECORDS)
    tr.write_line(f"data lost: {lost}" + ("" if lost == 0 else "  <-- MUST BE 0"))
