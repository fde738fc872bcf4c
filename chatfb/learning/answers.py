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
two children can change what a name serves; on merged weights a promotion also means the next cycle asks the
base model again) and the base model's files and how they are served (`base_id`, `model_identity`: another
base model is asked again); adapter names are versioned, so one name is one set of weights. Each cycle keeps
only the base model's and the live adapter's answers for the weights the server holds (`AnswerBook.keep_only`,
`AnswerBook.keep_base`), and `delete-user` drops those of the adapters that trained on the user's rows
(`AnswerBook.forget`); an adapter carrying a deleted user's data is never kept across cycles.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def model_identity(base: str | Path, *served: object) -> str:
    """A short fingerprint of the base model's files (its folder; its config, generation config and tokenizer
    config; its weight files' names, sizes and modification times) and of `served` (how the server runs it: its
    dtype, an external server's address): answers filed for one base model are never read for another."""
    base = Path(base)
    parts = [str(base.resolve()), *map(repr, served)]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        try:
            parts.append(hashlib.sha256((base / name).read_bytes()).hexdigest())
        except OSError:
            parts.append("-")  # not there, or not a local folder: its path alone
    try:
        weights = sorted(base.glob("*.safetensors")) + sorted(base.glob("*.bin"))
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in weights]
    except OSError:
        pass
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
            filed = {keys[i]: [model, self.merged, self.base_id, a] for i, a in zip(missing, fresh)}
            book.update(filed)
            with self._lock, self._file_lock():  # what another thread or process filed meanwhile stays
                self._write({**self._read(), **filed})
        return [book[k][3] for k in keys]

    def _key(self, kind: str, model: str, prompt: list[dict], max_tokens: int) -> str:
        asked = json.dumps([kind, self.base_id, self.merged, model, max_tokens, prompt], sort_keys=True)
        return hashlib.sha256(asked.encode()).hexdigest()

    def _read(self) -> dict:
        """{key: [model, merged, base_id, answer]}; entries in another form (an older file) are ignored."""
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
        return {k: v for k, v in book.items() if isinstance(v, list) and len(v) == 4 and isinstance(v[0], str)}

    def keep_only(self, models: set[str], merged: str | None = None) -> int:
        """Drop every answer but those of `models` asked with the server's weights holding `merged` (the
        answers this cycle can read); returns how many went."""
        return self._drop(lambda model, m, base_id: model not in models or m != merged)

    def keep_base(self, base_id: str) -> int:
        """Drop every answer of another base model than `base_id`; returns how many went."""
        return self._drop(lambda model, merged, b: b != base_id)

    def forget(self, models: set[str]) -> int:
        """Drop every answer of the models in `models`; returns how many went."""
        return self._drop(lambda model, merged, base_id: model in models)

    def _drop(self, gone: Callable[[str, str | None, str | None], bool]) -> int:
        if self.path is None:
            return 0
        with self._lock, self._file_lock():
            book = self._read()
            kept = {k: v for k, v in book.items() if not gone(*v[:3])}
            if len(kept) != len(book):
                self._write(kept)
            return len(book) - len(kept)

    @contextmanager
    def _file_lock(self):
        """Every read-modify-write of the file, in any process (a cycle's child, delete-user in the app), one at
        a time."""
        if self.path is None:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("could not lock the answer file %s: %s", self.path, e)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, book: dict) -> None:
        if self.path is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(book))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not keep the answers in %s: %s", self.path, e)
            if "tmp" in locals():
                Path(tmp).unlink(missing_ok=True)
