"""Greedy answers to the cycle's fixed general questions, asked once a cycle however many adapters it trains.

A cycle trains the shared adapter, then up to CHATFB_PERSONAL_MAX_PER_CYCLE personal ones, each in a child
process of its own (chatfb.learning.cycle). Every personal child replays what the live shared adapter answers to
the same general questions (chatfb.learning.worker.replay_examples), and every gate compares the candidate's
control answers with the base model's and the incumbent's (chatfb.learning.gate): the same greedy requests to
the same model, once per user. The children of one cycle share one `AnswerBook` file
(work/<shared adapter>/answers.json), so each of these answers is generated once a cycle.

Only the fixed questions go in it (the replay and control prompts), never a user's prompt or reply, and only
the answers of the base model and the shared adapters (`keep`): a personal adapter trained on one user's rows
may repeat them, and its answers are never asked twice in a cycle anyway. It holds nothing `delete-user` must find. An answer is filed under the model name it was asked of and the shared adapter
the server's weights hold (`merged`, chatfb.serving.merged), since a promotion between two children can change
what a name serves; adapter names are versioned, so one name is one set of weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ANSWERS = "answers.json"


class AnswerBook:
    """Answers by (what was asked, of which model); `path` None keeps nothing (every answer is generated)."""

    def __init__(self, path: str | Path | None, merged: str | None = None, keep: Callable[[str], bool] | None = None):
        self.path = Path(path) if path else None
        self.merged = merged
        self.keep = keep or (lambda model: True)  # whose answers may be filed
        self.hits = 0
        self.asked = 0
        self._lock = threading.Lock()  # the gate asks several models' answers at once

    def answers(self, kind: str, model: str, prompts: list[list[dict]], max_tokens: int,
                ask: Callable[[list[list[dict]]], list]) -> list:
        """The answers of `model` to `prompts` (`kind` names how they were asked: greedy and cut off or not);
        those not on file come from `ask(missing prompts)` (one list, in order) and are filed."""
        if not self.keep(model):
            with self._lock:
                self.asked += len(prompts)
            return list(ask(prompts))
        book = self._read()
        keys = [self._key(kind, model, p, max_tokens) for p in prompts]
        missing = [i for i, k in enumerate(keys) if k not in book]
        with self._lock:
            self.hits += len(prompts) - len(missing)
            self.asked += len(missing)
        if missing:
            fresh = ask([prompts[i] for i in missing])
            if len(fresh) != len(missing):
                raise ValueError(f"asked {len(missing)} prompts, got {len(fresh)} answers")
            filed = {keys[i]: a for i, a in zip(missing, fresh)}
            book.update(filed)
            with self._lock:  # what another thread filed meanwhile stays
                self._write({**self._read(), **filed})
        return [book[k] for k in keys]

    def _key(self, kind: str, model: str, prompt: list[dict], max_tokens: int) -> str:
        asked = json.dumps([kind, self.merged, model, max_tokens, prompt], sort_keys=True)
        return hashlib.sha256(asked.encode()).hexdigest()

    def _read(self) -> dict:
        if self.path is None:
            return {}
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a torn or foreign file: ask again, never fail the cycle over it
            log.warning("ignoring the cycle's answer file %s: %s", self.path, e)
            return {}

    def _write(self, book: dict) -> None:
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(book))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not keep the cycle's answers in %s: %s", self.path, e)
