"""The admin operations, in one place: what the CLI, the control API and the admin tab all call.

`AdminService` owns the rules (which guideline may be approved, how long one may be, which version is
"previous"), so the three front doors cannot drift apart. The process that owns the store builds one:
the app (with its Runtime as `cycles` and its model client, for "Train now" and the compare view), or
the CLI when no app runs. The CLI reaches the app's through the control API (chatfb.app.control),
which accepts the operations named in `OPS`.

To add an admin operation: a method here; its name in `OPS` if the CLI calls it while the app runs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from chatfb.config import Settings, settings_from_json
from chatfb.serving.adapters import AdapterError, AdapterRegistry
from chatfb.serving.model_client import ModelError
from chatfb.store.db import Store

# The operations the control API accepts (the CLI's, while the app owns the store). Their arguments
# and results must be JSON.
OPS = ("import_feedback", "snapshot", "adapters", "add_adapter", "promote", "rollback", "delete_user", "guidelines",
       "add_guideline", "set_guideline_status", "start_cycle", "cycle_status", "create_api_key", "api_keys",
       "revoke_api_keys", "review_queue", "review", "flag_author", "unflag_author", "uptake")


class AdminError(RuntimeError):
    """An admin operation that cannot be done; str(e) says why (shown to the admin as it is)."""


class CycleRunning(AdminError):
    """A learning cycle is running already (one at a time)."""


class AdminService:
    """The admin operations on a store this process owns. `cycles` is the app's Runtime (start_training,
    cycle_status, training_running, training_log_path): without an app the CLI runs cycles itself.
    `client` answers the compare view (the app's model client)."""

    def __init__(self, store: Store, registry: AdapterRegistry, cycles=None, settings: Settings | None = None,
                 client=None):
        self.store = store
        self.registry = registry
        self.cycles = cycles
        self.settings = settings or Settings(data_dir=registry.data_dir)
        self.client = client

    def close(self):
        pass

    # -- data ------------------------------------------------------------------------------
    def import_feedback(self, records: list[dict], trusted: bool = False) -> int:
        """`trusted`: the operator vouches for the file, so it may train the shared adapter (chatfb.learning.trust)."""
        from chatfb.learning.exports import parse_record

        # Validated again here: the records may come over the control API. Sizes were checked by the CLI.
        return self.store.import_feedback([parse_record(r, 10**9) for r in records], trusted=bool(trusted))

    def snapshot(self) -> str:
        return str(self.store.snapshot(self.settings.layout.latest_snapshot))

    def export_all(self) -> Path:
        """Write all three TRL formats under <data_dir>/exports/<UTC time>/ (never a path from a browser)."""
        from chatfb.learning.exports import export
        from chatfb.learning.rows import EXPORT_FORMATS

        out = self.settings.layout.exports / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        from chatfb.learning.training_data import shared_scopes

        records, dismissed = self.store.feedback_records(), self.store.rejected_candidates()
        scopes = shared_scopes(records, self.settings, self.store.reviews(), self.store.flagged_authors(),
                               self.store.rejected_content())
        for fmt in EXPORT_FORMATS:
            export(records, fmt, out, dismissed=dismissed, scopes=scopes, uptake_rows=self.store.uptake())
        return out

    def delete_user(self, user_name: str) -> int:
        """Delete a user's conversations and feedback, their rows in every training and export file
        (chatfb.learning.forget), their personal adapters (unloaded, files and rows), and mark each shared
        adapter trained on them (`deleted_users`: it carries their data until a cycle retrains). Returns
        conversations removed."""
        from chatfb.learning.forget import forget_user

        records = self.store.feedback_records(user_name=user_name)  # read first: the files are matched by them
        removed = self.store.delete_user(user_name)
        self.registry.remove_personal(user_name)  # a named user's author id is their name (trust.who)
        layout = self.settings.layout
        trained = set(forget_user(layout, user_name, records)) - {"exports"}
        if records:  # an adapter whose cycle files are gone, trained after their first feedback, may carry it
            first = min(r.created_at for r in records)
            trained |= {a["name"] for a in self.store.adapters() if a["status"] != "failed" and a["created_at"] >= first
                        and not (layout.work(a["name"]) / "sft.jsonl").exists()}
        self.store.mark_deleted_user(sorted(n for n in trained if self.store.adapter(n)))
        from chatfb.learning.answers import AnswerBook

        AnswerBook(layout.answers).forget(trained)  # never replayed again from a file: asked anew while live
        return removed

    # -- the trust policy's review queue (chatfb.learning.trust) ----------------------------
    def review_queue(self, settings_json: str | None = None) -> list[dict]:
        """Feedback waiting for an admin's review under the trust policy of these settings (a CLI's, or the
        app's own), grouped by what it would teach (chatfb.learning.trust.queue_view)."""
        from chatfb.learning.training_data import review_queue

        settings = settings_from_json(settings_json) if settings_json else self.settings
        return review_queue(self.store.feedback_records(), settings, self.store.reviews(), self.store.flagged_authors(),
                            self.store.rejected_content())

    def review(self, feedback_ids: list[str], decision: str) -> int:
        """Approve (it may train the shared adapter) or reject (it never does, nor anything on its question)
        feedback rows; a row that no longer exists is an error and nothing is decided."""
        from chatfb.store.records import StoreError

        from chatfb.learning.trust import review_content

        ids = [i.strip() for i in feedback_ids if i.strip()]
        if not ids:
            raise AdminError("name the feedback ids to decide on (see: python -m chatfb review list)")
        # kept with the decision: a rejection outlives its row (its conversation deleted, its text sent again)
        wanted = set(ids)
        content = {r.feedback_id: review_content(r) for r in self.store.feedback_records() if r.feedback_id in wanted}
        try:
            self.store.set_review(ids, decision, content)
        except StoreError as e:
            raise AdminError(f"{e} (see: python -m chatfb review list)") from None
        return len(set(ids))

    def flag_author(self, author: str, reason: str = "") -> None:
        """Flag a user name or anonymous session (as `review list` shows it): nothing of theirs trains."""
        self.store.flag_author(author.strip(), reason)

    def unflag_author(self, author: str) -> None:
        self.store.unflag_author(author.strip())

    def feedback_per_day(self) -> list[tuple]:
        return self.store.feedback_per_day()

    def critique_texts(self) -> list[str]:
        return self.store.critique_texts()

    def critique_topics(self, top: int = 10, threshold: float = 0.45, limit: int = 500) -> list[tuple[str, int]]:
        """The most-critiqued topics: active critiques (at most `limit`) grouped by sentence-embedding
        similarity (chatfb.critique.similarity), each group named by its most central critique, largest first:
        [(label, critiques in the group)]. A critique joins the group whose centroid is at least `threshold`
        cosine-close, else starts its own."""
        from chatfb.critique.similarity import embed, group_similar

        texts = [" ".join(t.split()) for t in self.critique_texts()[:limit] if t and t.strip()]
        out = [(texts[central], len(members)) for members, central in group_similar(embed(texts), threshold)]
        return sorted(out, key=lambda t: -t[1])[:top]

    def candidates(self, limit: int = 200) -> list[dict]:
        """Candidate answers the learning cycles made from critiques and guidelines, newest first."""
        return self.store.nightly_candidates(limit)

    # -- adapter versions ------------------------------------------------------------------
    def adapters(self) -> list[dict]:
        return self.store.adapters()

    def live_adapter(self) -> dict | None:
        return self.store.live_adapter()

    def add_adapter(self, name: str, path: str) -> None:
        """Register an adapter folder trained elsewhere (under <data_dir>/adapters) as a candidate."""
        self.store.add_adapter(name, None, "candidate", path)

    def uptake(self, name: str | None = None) -> dict:
        """Which trained feedback items an adapter learnt (chatfb.learning.uptake.report: per item and per
        cluster of similar questions): `name`'s, or (None) those of the adapters live now, shared and personal."""
        from chatfb.learning import uptake

        name = (name or "").strip() or None
        if name is not None and self.store.adapter(name) is None:
            raise AdminError(f"no adapter named {name!r} (see: python -m chatfb adapters list)")
        live = {a["name"] for a in self.store.adapters() if a["status"] == "live"}
        rows = [r for r in self.store.uptake(adapter=name) if name is not None or r["adapter"] in live]
        return uptake.report(rows, {r.feedback_id: r for r in self.store.feedback_records()})

    def promote(self, name: str) -> None:
        self._not_during_a_cycle("promote")
        self.registry.promote((name or "").strip())

    def rollback(self) -> str | None:
        self._not_during_a_cycle("roll back")
        return self.registry.rollback()

    def _not_during_a_cycle(self, what: str) -> None:
        """On merged weights a running cycle measures its candidate as a difference to what the server holds now:
        changing that under it would judge the wrong model (its own promotion comes after its measurements)."""
        if self.registry.merging and self.cycles is not None and self.cycles.training_running():
            raise AdminError(f"a learning cycle is running on the model server's current weights: {what} once it ends")

    @property
    def replicated(self) -> bool:
        """Several model replicas behind a router (the admin tab then shows each)."""
        return self.registry.replicas is not None

    def replica_states(self) -> list:
        return self.registry.replica_states()

    def compare(self, prompt: str) -> tuple[str, str, str]:
        """Greedy replies to one prompt from the base model, the previous version and the live one
        ("(none)" where there is no such version)."""
        s, router = self.settings, self.registry.router
        prompt = (prompt or "").strip()[: s.max_message_chars]
        if not prompt:
            return "Type a prompt first.", "", ""
        messages = [{"role": "system", "content": s.system_prompt}, {"role": "user", "content": prompt}]
        live = self.store.live_adapter()
        outs = []
        for name in (None, self.registry.previous_version(), live["name"] if live else None):
            if name is None and outs:
                outs.append("(none)")
                continue
            try:
                if name:
                    self.registry.load_candidate(name)
                outs.append(self.client.complete(messages, name or router.base_name, s.max_tokens)[0])
            except (AdapterError, ModelError) as e:
                outs.append(f"⚠️ {e}")
            finally:
                if name and name != router.current:  # the previous version: give its LoRA slot back
                    self.registry.unload(name)
        return tuple(outs)

    # -- guidelines for everyone -----------------------------------------------------------
    def guidelines(self) -> list[dict]:
        return self.store.guidelines()

    def global_guidelines(self) -> list[dict]:
        """Guidelines for everyone, suggested or approved."""
        return self.store.global_guidelines()

    def add_guideline(self, text: str) -> str:
        """A guideline for everyone, approved at once (the admin wrote it)."""
        return self.store.add_guideline(self._guideline_text(text), "global", "active")

    def set_guideline_status(self, guideline_id: str, status: str) -> None:
        """Approve ("active": only a suggestion for everyone needs it) or retire ("retired": any guideline)."""
        g = self._guideline((guideline_id or "").strip())
        if status == "active" and g["scope"] != "global":
            raise AdminError("only guidelines suggested for everyone need approval")
        self.store.update_guideline(g["id"], status=status)

    def edit_guideline(self, guideline_id: str, text: str) -> None:
        g = self._guideline((guideline_id or "").strip())
        self.store.update_guideline(g["id"], text=self._guideline_text(text))

    def _guideline(self, guideline_id: str) -> dict:
        g = self.store.guideline(guideline_id)
        if g is None:
            raise AdminError(f"no guideline with id {guideline_id!r}")
        return g

    def _guideline_text(self, text: str) -> str:
        text, limit = " ".join((text or "").split()), self.settings.max_guideline_chars
        if not text:
            raise AdminError("a guideline needs some text")
        if len(text) > limit:
            raise AdminError(f"the guideline is {len(text)} characters long; the limit is {limit}")
        return text

    # -- API keys (chatfb.app.api_keys) ---------------------------------------------------
    def create_api_key(self, user_name: str) -> dict:
        """A new API key for `user_name`: {"id", "user_name", "prefix", "key"} (the key is shown once)."""
        from chatfb.app.api_keys import ApiKeyError, create_key

        try:
            return create_key(self.store, user_name)
        except ApiKeyError as e:
            raise AdminError(str(e)) from None

    def api_keys(self, user_name: str | None = None) -> list[dict]:
        return self.store.api_keys(user_name)

    def revoke_api_keys(self, user_name: str, key_id: str | None = None) -> int:
        return self.store.revoke_api_keys(user_name, key_id)

    # -- learning cycles -------------------------------------------------------------------
    def start_cycle(self, settings_json: str | None = None, promote: bool = True) -> int:
        """Start a learning cycle in the app, with the given settings (a CLI's) or the app's own; returns
        its number (see cycle_status)."""
        if self.cycles is None:
            raise AdminError("no app runs here to start a learning cycle in")
        number = self.cycles.start_training(settings_json and settings_from_json(settings_json), promote)
        if number is None:
            raise CycleRunning("a learning cycle is already running (started from the admin tab, the CLI or the schedule)")
        return number

    def cycle_status(self) -> dict:
        """{"running": bool, "finished": number of the last finished cycle, "result": its summary or None}."""
        if self.cycles is None:
            raise AdminError("no app runs here")
        return self.cycles.cycle_status()

    def last_cycle(self) -> dict | None:
        """The last finished cycle's result in this app (chatfb.learning.cycle.CycleResult as a dict), or None
        (none finished since the app started, or no app runs here)."""
        if self.cycles is None:
            return None
        return self.cycles.cycle_status().get("result")

    def compare_names(self) -> tuple[str | None, str | None]:
        """(the previous version, the live version) the compare view answers with; None where there is none."""
        live = self.store.live_adapter()
        return self.registry.previous_version(), live["name"] if live else None

    def cycle_log(self) -> tuple[bool, list[str]] | None:
        """(a cycle is running, the lines of the newest cycle's log), or None before the first cycle."""
        try:
            lines = self.settings.layout.nightly_log.read_text(errors="replace").splitlines()
        except OSError:
            return None
        return bool(self.cycles and self.cycles.training_running()), lines
