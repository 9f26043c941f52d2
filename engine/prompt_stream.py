"""A deterministic, resumable stream of prompts for RL and on-policy distillation.

Each epoch is a seeded permutation of the rows; the position (epoch, index) is all the
state there is, so a stage that saves it in its checkpoint resumes without repeating or
skipping a prompt.
"""

from __future__ import annotations

import random


class PromptStream:
    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("PromptStream needs at least one row")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows) or state["seed"] != self.seed:
            raise ValueError(f"prompt stream state is for {state['num_rows']} rows / seed {state['seed']}, "
                             f"not {len(self.rows)} rows / seed {self.seed}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
