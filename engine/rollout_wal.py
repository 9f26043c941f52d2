"""Rollout write-ahead log: finished rollout batches survive a killed stage (docs/DESIGN.md section 11).

A stage's rollouts are made of batches: one `engine.rollout.rollout` call (one domain's
groups of a GRPO step or sampling round, one domain's samples of an OPD round). Before a
batch is generated a `begin` record is appended; when it is done, a `done` record with all
its trajectories (every group of the batch). Each record is one line,
`<crc32 hex8> <json>\\n`, written with one `write` and fsync'd, so a batch is durable once
`done` returns (one fsync per batch of groups). A record cut short by a kill can only be
the last one: it fails its CRC (or lacks its newline) and is cut off when the log is opened;
damage before the last record is a `WALError` naming the file and line.

Resume: `logged_rollout` returns a logged batch instead of generating it when the key and
the fingerprint of its inputs (prompt ids, sampling params, turns) match; only batches that
are not in the log are generated. Sampling is seeded per row from (seed, prompt index,
sample index) and a batch is replayed or regenerated whole with the same inputs, so the
resumed stage computes exactly what an uninterrupted one does; what a kill costs is the
one batch in flight. The log's counts (per key: generations begun, completed) give
`generated`, `regenerated` (batches begun again after a kill) and, per process, `replayed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path


class WALError(RuntimeError):
    """A rollout log damaged before its last record."""


def _line(rec: dict) -> bytes:
    body = json.dumps(rec, separators=(",", ":"), sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def read_wal(path: str | Path) -> tuple[list[dict], int]:
    """(records, length of the valid prefix in bytes); a torn last record is left out."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    records, pos, lines = [], 0, data.split(b"\n")
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
        if i == len(lines) - 1:  # no newline after it: empty (clean end) or torn
            break
        try:
            crc, body = raw.split(b" ", 1)
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("crc mismatch")
            records.append(json.loads(body))
        except ValueError as e:
            if last:
                break
            raise WALError(f"corrupt rollout log {path}: record {i + 1} ({e}) is not the last one") from None
        pos += len(raw) + 1
    return records, pos


def wal_counts(records: list[dict]) -> dict:
    """{"generated", "regenerated", "completed"} from a log's records."""
    begun: dict[str, int] = {}
    done = set()
    for r in records:
        if r.get("t") == "begin":
            begun[r["k"]] = begun.get(r["k"], 0) + 1
        elif r.get("t") == "done":
            done.add(r["k"])
    return {"generated": sum(begun.values()), "regenerated": sum(max(n - 1, 0) for n in begun.values()),
            "completed": len(done)}


def in_flight(path: str | Path) -> list[str]:
    """Keys begun but not done in the log (what a kill now would lose)."""
    records, _ = read_wal(path)
    done = {r["k"] for r in records if r.get("t") == "done"}
    return [r["k"] for r in records if r.get("t") == "begin" and r["k"] not in done]


class RolloutWAL:
    """One append-only log file; opening it cuts a torn last record off."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, valid = read_wal(self.path)
        if self.path.is_file() and self.path.stat().st_size != valid:
            with open(self.path, "r+b") as f:
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        self._done = {r["k"]: r for r in records if r.get("t") == "done"}
        self._records = records
        self.replayed = 0
        self._fh = open(self.path, "ab", buffering=0)

    def _append(self, rec: dict) -> None:
        self._fh.write(_line(rec))
        os.fsync(self._fh.fileno())
        self._records.append(rec)

    def lookup(self, key: str, fingerprint: str) -> list | None:
        rec = self._done.get(key)
        if rec is None or rec.get("f") != fingerprint:
            return None
        self.replayed += 1
        return rec["p"]

    def begin(self, key: str) -> None:
        self._append({"t": "begin", "k": key})

    def done(self, key: str, fingerprint: str, payload: list) -> None:
        rec = {"t": "done", "k": key, "f": fingerprint, "p": payload}
        self._append(rec)
        self._done[key] = rec

    def counts(self) -> dict:
        return {**wal_counts(self._records), "replayed": self.replayed}

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def rollout_fingerprint(prompt_ids: list[list[int]], sampling, *, max_turns: int, env: bool,
                        max_response_tokens: int | None = None, tool_format: str | None = None,
                        template_kwargs: list[dict] | None = None) -> str:
    blob = json.dumps({"p": [list(map(int, p)) for p in prompt_ids], "s": repr(sampling), "m": max_turns, "e": env,
                       **({"r": max_response_tokens} if max_response_tokens is not None else {}),
                       **({"f": tool_format} if tool_format is not None else {}),
                       **({"k": template_kwargs} if template_kwargs is not None else {})})
    return hashlib.sha256(blob.encode()).hexdigest()


def logged_rollout(wal: RolloutWAL | None, key: str, generator, prompt_ids: list[list[int]], sampling, *,
                   tokenizer, environment=None, max_turns: int = 4, max_response_tokens: int | None = None,
                   tool_format: str | None = None, template_kwargs: list[dict] | None = None):
    """`engine.rollout.rollout`, replayed from `wal` when the batch `key` is logged there
    with the same inputs, else generated and logged (`wal=None`: not logged)."""
    from engine.rollout import Trajectory, rollout

    run = lambda: rollout(generator, prompt_ids, sampling, tokenizer=tokenizer, environment=environment,  # noqa: E731
                          max_turns=max_turns, max_response_tokens=max_response_tokens, tool_format=tool_format,
                          **({"template_kwargs": template_kwargs} if template_kwargs is not None else {}))
    if wal is None:
        return run()
    fp = rollout_fingerprint(prompt_ids, sampling, max_turns=max_turns, env=environment is not None,
                             max_response_tokens=max_response_tokens, tool_format=tool_format,
                             template_kwargs=template_kwargs)
    logged = wal.lookup(key, fp)
    if logged is not None:
        return [Trajectory(**t) for t in logged]
    wal.begin(key)
    trajs = run()
    wal.done(key, fp, [dataclasses.asdict(t) for t in trajs])
    return trajs


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in ("generated", "regenerated", "completed", "replayed")}


class StepLogs:
    """A GRPO stage's logs: one file per step under `root` (`step-NNNNNN.wal`). A checkpoint
    at step s makes the logs of steps < s useless: `carry(s)` is the tally to store in it
    (what those logs counted, plus the tally carried so far) and `prune(s)` deletes them,
    so the logs hold at most `save_every` steps of rollouts."""

    def __init__(self, root: str | Path, *, carried: dict | None, start_step: int):
        self.root = Path(root)
        self.carried = _add(carried or {}, {})
        self.replayed = 0
        self.prune(start_step)  # tallied in the checkpoint resumed from (or a fresh run: none)

    def _segments(self) -> dict[int, Path]:
        return {int(p.stem.split("-")[1]): p for p in self.root.glob("step-*.wal")}

    def open(self, step: int) -> RolloutWAL:
        return RolloutWAL(self.root / f"step-{step:06d}.wal")

    def closed(self, wal: RolloutWAL) -> None:
        self.replayed += wal.replayed
        wal.close()

    def counts(self, before: int | None = None) -> dict:
        """The carried tally plus the logs of steps < `before` (all logs: None)."""
        live = [wal_counts(read_wal(p)[0]) for s, p in self._segments().items() if before is None or s < before]
        out = self.carried
        for c in live:
            out = _add(out, c)
        return _add(out, {"replayed": self.replayed})

    def carry(self, before: int) -> dict:
        return self.counts(before)

    def prune(self, before: int) -> None:
        for s, p in self._segments().items():
            if s < before:
                p.unlink(missing_ok=True)

    def checkpointed(self, before: int, carried: dict) -> None:
        """After a checkpoint holding `carried` (from `carry(before)`) is written."""
        self.carried, self.replayed = _add(carried, {}), 0
        self.prune(before)
