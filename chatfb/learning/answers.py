"""Greedy answers to the cycles' fixed general questions, asked once however many adapters and cycles need them.

A cycle trains the shared adapter, then up to CHATFB_PERSONAL_MAX_PER_CYCLE personal ones, each in a child
process of its own (chatfb.learning.cycle). Every personal child replays what the live shared adapter answers to
the same general questions (chatfb.learning.worker.replay_examples), and every gate compares the candidate's
control answers with the base model's and the incumbent's (chatfb.learning.gate): the same greedy requests to
the same model, once per user, and again every night while the live adapter stays the same. So every cycle
shares one `AnswerBook` file (the data folder's work/answers.json, `DataLayout.answers`): each of these answers
is generated once, and a cycle whose incumbent is the adapter the last one gated (its control answers filed
then) or still the base model asks neither model again.

Only the fixed questions go in it (the replay and control prompts), never a user's prompt or reply, and only
the answers of the base model and the shared adapters (`keep`): a personal adapter trained on one user's rows
may repeat them, and its answers are never asked twice anyway. An answer is filed under the model name it was
asked of, the shared adapter the server's weights hold (`merged`, chatfb.serving.merged; a promotion between
two children can change what a name serves) and the base model's files (`base_id`, `model_identity`: another
base model is asked again); adapter names are versioned, so one name is one set of weights. Each cycle keeps
only the base model's and the live adapter's answers (`AnswerBook.keep_only`), and `delete-user` drops those of
the adapters that trained on the user's rows (`AnswerBook.forget`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)



def model_identity(base: str | Path) -> str:
    """A short fingerprint of the base model's files (its folder, config and weight files' names and sizes):
    answers filed for one base model are never read for another."""
    base = Path(base)
    parts = [str(base.resolve())]
    try:
        parts.append((base / "config.json").read_text())
        parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(base.glob("*.safetensors")) + sorted(base.glob("*.bin"))]
    except OSError:
        pass  # not a local folder we can read: its path alone
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class AnswerBook:
    """Answers by (what was asked, of which model); `path` None keeps nothing (every answer is generated)."""

    def __init__(self, path: str | Path | None, merged: str | None = None, keep: Callable[[str], bool] | None = None,
                 base_id: str | None = None):
        self.path = Path(path) if path else None
        self.merged = merged
        self.base_id = base_id
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
            filed = {keys[i]: [model, a] for i, a in zip(missing, fresh)}
            book.update(filed)
            with self._lock:  # what another thread filed meanwhile stays
                self._write({**self._read(), **filed})
        return [book[k][1] for k in keys]

    def _key(self, kind: str, model: str, prompt: list[dict], max_tokens: int) -> str:
        asked = json.dumps([kind, self.base_id, self.merged, model, max_tokens, prompt], sort_keys=True)
        return hashlib.sha256(asked.encode()).hexdigest()

    def _read(self) -> dict:
        """{key: [model, answer]}; entries in another form (an older file) are ignored."""
        if self.path is None:
            return {}
        try:
            book = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a torn or foreign file: ask again, never fail the cycle over it
            log.warning("ignoring the answer file %s: %s", self.path, e)
            return {}
        if not isinstance(book, dict):
            return {}
        return {k: v for k, v in book.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}

    def keep_only(self, models: set[str]) -> int:
        """Drop every answer of a model not in `models`; returns how many went."""
        return self._drop(lambda model: model not in models)

    def forget(self, models: set[str]) -> int:
        """Drop every answer of the models in `models`; returns how many went."""
        return self._drop(lambda model: model in models)

    def _drop(self, gone: Callable[[str], bool]) -> int:
        with self._lock:
            book = self._read()
            kept = {k: v for k, v in book.items() if not gone(v[0])}
            if len(kept) != len(book):
                self._write(kept)
            return len(book) - len(kept)

    def _write(self, book: dict) -> None:
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(book))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not keep the answers in %s: %s", self.path, e)
