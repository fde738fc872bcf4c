"""LoRA adapter versions: routing new chats, hot-loading into vLLM, promote and rollback.

One AdapterRegistry per store owner: the app's drives its vLLM servers; the CLI's (no app running,
`AdapterRegistry.without_servers`) only records which version is live, with the same checks.

Every adapter version has a new name (chatfb-v0001, ...) because vLLM refuses to load a name it
already has. A user with a personal adapter (chatfb-u<hash of the user>-v0001, ...; trained by
chatfb.learning.cycle) is served it per request, and only they are: vLLM serves one LoRA per request,
so a personal adapter is a whole LoRA on the base model, trained on from the shared one. Promotion loads the new version into every configured server, routes new chats to
it, and unloads the previous one only after its in-flight requests finished, so no request
fails during a swap. The store remembers which version is live, so a restart loads it again.

With `merging` on (the app's own single server), the live shared version is not a LoRA at all: it is
folded into the server's weights, reloaded in place (chatfb.serving.merged), and every other model
(personal adapters, candidates, the base model) is served as its difference to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import struct
import threading
import time
from collections import Counter
from pathlib import Path

from chatfb.layout import DataLayout
from chatfb.serving.merged import MergeError, ServedNames, merge_checkpoint
from chatfb.serving.model_client import ModelClient, ModelError
from chatfb.store.db import Store

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "chatfb"  # adapter versions are named <prefix>-v0001, <prefix>-v0002, ...


class AdapterError(RuntimeError):
    """An adapter operation that cannot be done; str(e) is safe for the admin view."""


def adapter_name(number: int, prefix: str = ADAPTER_PREFIX) -> str:
    return f"{prefix}-v{number:04d}"


def next_adapter_name(store: Store, prefix: str = ADAPTER_PREFIX) -> str:
    head = f"{prefix}-v"
    numbers = [int(a["name"][len(head):]) for a in store.adapters()
               if a["name"].startswith(head) and a["name"][len(head):].isdigit()]
    return adapter_name(max(numbers, default=0) + 1, prefix)


def personal_prefix(owner: str, prefix: str = ADAPTER_PREFIX) -> str:
    """The name prefix of `owner`'s personal adapters: <prefix>-u<short hash> (the name itself never shows a user's
    name or session to vLLM's model list)."""
    return f"{prefix}-u{hashlib.sha256(owner.encode()).hexdigest()[:10]}"


_PERSONAL = re.compile(r"-u[0-9a-f]{10}-v(\d+)$")


def is_personal(name: str | None) -> bool:
    """`name` is a personal adapter's (<prefix>-u<short hash>-v<N>)."""
    return bool(_PERSONAL.search(name or ""))


def model_label(name: str | None) -> str | None:
    """What the chat shows under a reply: "your model vN" for a personal adapter (only its owner sees the
    replies it made), else the name unchanged."""
    m = _PERSONAL.search(name or "")
    return f"your model v{int(m.group(1))}" if m else name


def confined_path(data_dir: Path, relative: str | Path) -> Path:
    """Resolve a user- or DB-supplied path inside <data_dir>/adapters; refuse anything outside it."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise AdapterError("paths must be relative and stay inside the data folder")
    root = DataLayout(Path(data_dir)).adapters.resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise AdapterError("paths must stay inside the data folder")
    return full


# LoRA weight shapes are [rank, in_features] (lora_A) and [out_features, rank] (lora_B); which
# of them equal the base model's hidden or intermediate size, by projection.
_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_HIDDEN_OUT = ("o_proj", "down_proj")


def check_base_model(name: str, adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter whose LoRA shapes do not fit the base model (made for another model), before
    vLLM sees it: some vLLM versions load a mismatched adapter and fail only on the next request.
    Reads the safetensors header (not the weights) and the base model's config.json."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text())
        with open(weights, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > weights.stat().st_size - 8:  # not a safetensors header length (damaged file)
                raise ValueError(f"header length {size} exceeds the file")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        return  # nothing to compare (another weights format): vLLM's own check decides
    except (OSError, ValueError, struct.error) as e:
        raise AdapterError(f"adapter {name} has unreadable weights ({type(e).__name__})") from None
    hidden, inter, layers = config.get("hidden_size"), config.get("intermediate_size"), config.get("num_hidden_layers")
    for key, meta in header.items():
        m = re.search(r"\.layers\.(\d+)\..*?(\w+_proj)\.(lora_A|lora_B)\.", key)
        if not m or not isinstance(meta, dict) or len(meta.get("shape", [])) != 2:
            continue
        layer, proj, part = int(m.group(1)), m.group(2), m.group(3)
        rows, cols = meta["shape"]
        found = None
        if layers and layer >= layers:
            found = f"it has weights for layer {layer} ({layer + 1}+ layers, not {layers})"
        elif part == "lora_A" and proj in _HIDDEN_IN and hidden and cols != hidden:
            found = f"its {proj} takes hidden size {cols}, not {hidden}"
        elif part == "lora_B" and proj in _HIDDEN_OUT and hidden and rows != hidden:
            found = f"its {proj} gives hidden size {rows}, not {hidden}"
        elif part == "lora_A" and proj == "down_proj" and inter and cols != inter:
            found = f"its down_proj takes intermediate size {cols}, not {inter}"
        elif part == "lora_B" and proj in ("gate_proj", "up_proj") and inter and rows != inter:
            found = f"its {proj} gives intermediate size {rows}, not {inter}"
        if found:
            raise AdapterError(f"adapter {name} was made for another base model: {found}; nothing was loaded")


class AdapterRouter:
    """Which model name new requests use, and how many requests are in flight per name."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self.current = base_name
        self.personal: dict[str, str] = {}  # owner (chatfb.learning.trust.who) -> their live personal adapter
        self._inflight: Counter = Counter()
        self._cond = threading.Condition()

    def acquire(self, owner: str | None = None) -> str:
        """The model a request uses: `owner`'s live personal adapter if they have one, else the shared one."""
        with self._cond:
            name = self.personal.get(owner, self.current) if owner else self.current
            self._inflight[name] += 1
            return name

    def switch_personal(self, owner: str, name: str | None) -> str | None:
        """Serve `owner` their adapter `name` (None = the shared one again); returns the one they had."""
        with self._cond:
            return self.personal.pop(owner, None) if name is None else self._swap(owner, name)

    def _swap(self, owner: str, name: str) -> str | None:
        previous, self.personal[owner] = self.personal.get(owner), name
        return previous

    def release(self, name: str) -> None:
        with self._cond:
            self._inflight[name] -= 1
            self._cond.notify_all()

    def inflight(self, name: str) -> int:
        with self._cond:
            return self._inflight[name]

    def switch(self, name: str) -> str:
        with self._cond:
            previous, self.current = self.current, name
            return previous

    def wait_idle(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._inflight[name] > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


class AdapterRegistry:
    """Adapter versions in the store, loaded into one or more vLLM servers."""

    def __init__(self, store: Store, clients: list[ModelClient], router: AdapterRouter, data_dir: Path,
                 drain_timeout_s: float = 120.0, base_model_dir: Path | None = None):
        self.store = store
        self.base_model_dir = base_model_dir  # when known, adapters are checked against it before loading
        self.replicas = None  # a ReplicaSet: see for_replicas
        self.clients = clients
        self.router = router
        self.data_dir = Path(data_dir)
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self.last_swap_ms: float | None = None
        # Serve the live shared adapter merged into the weights (the app turns it on for its own single server)
        self.merging = False
        self.names = ServedNames(router.base_name)  # what is merged into the servers' weights now
        self.last_merge_timings: dict = {}  # the last merged activation: writing the weights, the servers' reload

    @property
    def merged(self) -> str | None:
        """The shared adapter folded into the servers' weights (None: they hold the base model's)."""
        return self.names.merged

    @classmethod
    def for_replicas(cls, store: Store, replicas, router: AdapterRouter, data_dir: Path, **kwargs) -> "AdapterRegistry":
        """For several replicas behind a router (chatfb.serving.replicas.ReplicaSet): a version is rolled out
        to them one by one, and live only once every one answers with it."""
        registry = cls(store, replicas.clients, router, data_dir, **kwargs)
        registry.replicas = replicas
        return registry

    @classmethod
    def without_servers(cls, store: Store, data_dir: Path, base_model_dir: Path | None = None) -> "AdapterRegistry":
        """For the CLI when no app runs: promote and rollback check and record which version is live
        (the app loads it into its server when it starts); adapters are checked against `base_model_dir`
        when it is given."""
        return cls(store, [], AdapterRouter("base model"), data_dir, base_model_dir=base_model_dir)

    def path_of(self, name: str) -> Path:
        a = self.store.adapter(name)
        if a is None or not a["path"]:
            raise AdapterError(f"no adapter named {name!r}")
        path = confined_path(self.data_dir, a["path"])
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"adapter {name} has no files on disk")
        return path

    def _load_everywhere(self, name: str) -> None:
        path = self.path_of(name)
        if self.base_model_dir is not None:
            check_base_model(name, path, self.base_model_dir)
        if self.replicas is not None:  # live only once every replica answered with it (RolloutError otherwise)
            self.replicas.roll_out(name, path)
            return
        load_into(self.clients, name, path)

    def load_candidate(self, name: str) -> None:
        """Load a candidate for evaluation without routing chats to it."""
        with self._lock:
            self._load_everywhere(name)

    def unload(self, name: str) -> None:
        for client in self.clients:
            client.unload_adapter_quietly(name)

    def activate(self, name: str | None, background_unload: bool = True) -> str:
        """Serve `name` (None = the base model) for new chats and mark it live."""
        stale: list[tuple[str, str]] = []
        with self._lock:
            t0 = time.perf_counter()
            if self.merging and self.clients:
                previous, stale = self._activate_merged(name)
            else:
                if name is not None:
                    self._load_everywhere(name)
                previous = self.router.switch(name or self.router.base_name)
            self.store.set_live(name)
            self.last_swap_ms = (time.perf_counter() - t0) * 1000
            log.info("now serving %s (was %s)%s; swap took %.0f ms", name or "base model", previous,
                     " merged into the weights" if self.merged == name and name else "", self.last_swap_ms)
        if stale:
            unload = threading.Thread(target=self._drain_and_unload_served, args=(stale,), daemon=True)
            unload.start() if background_unload else unload.run()
        elif previous not in (self.router.base_name, name) and not self.merging:
            if background_unload:
                threading.Thread(target=self._drain_and_unload, args=(previous,), daemon=True).start()
            else:
                self._drain_and_unload(previous)
        return previous

    def _activate_merged(self, name: str | None) -> tuple[str, list[tuple[str, str]]]:
        """Fold `name` (None: nothing) into every server's weights and route new chats to it; each live personal
        adapter is loaded as its difference to `name` first. Returns (the model served before, [(model, the
        serving name it no longer needs)])."""
        layout = DataLayout(self.data_dir)
        if self.base_model_dir is None:
            raise AdapterError("the base model's folder is not known here: nothing can be merged")
        weights = Path(self.base_model_dir)
        t0 = time.perf_counter()
        if name is not None:
            path = self.path_of(name)
            check_base_model(name, path, self.base_model_dir)
            self._vllm_accepts(name, path)
            try:
                weights = merge_checkpoint(self.base_model_dir, path, layout.merged / name)
            except MergeError as e:
                raise AdapterError(f"adapter {name} could not be merged into the model: {e}") from None
        old, new = self.names, ServedNames(self.router.base_name, name, layout.adapters, layout.served)
        personal, unservable = dict(self.router.personal), []
        for owner, p in list(personal.items()):  # what each of them is served, ready before the weights change
            try:
                load_into(self.clients, p, self.path_of(p), names=new)
            except (AdapterError, ModelError) as e:
                log.error("personal adapter %s cannot be served on %s: %s; its user gets the shared one", p, name, e)
                unservable.append(owner)
                personal.pop(owner)
        t1 = time.perf_counter()
        for i, client in enumerate(self.clients):
            try:
                client.reload_weights(str(weights.resolve()))
            except ModelError as e:
                self._weights_refused(self.clients[:i + 1], old, new, personal.values())
                raise AdapterError(f"the model server at {client.base_url} did not take the merged weights: {e}") from None
        self.last_merge_timings = {"merge_ms": (t1 - t0) * 1000, "reload_ms": (time.perf_counter() - t1) * 1000}
        self._use_names(new)
        for owner in unservable:
            self.router.switch_personal(owner, None)
        previous = self.router.switch(name or self.router.base_name)
        for other in layout.merged.glob("*"):  # the servers hold these weights now; a rollback merges again
            if other.name != name and not other.name.endswith(".partial"):
                shutil.rmtree(other, ignore_errors=True)
        keep = self._in_use()
        stale = [(m, old.served(m)) for m in dict.fromkeys([*personal.values(), previous]) if old.served(m) not in keep]
        if old.merged:  # whatever was loaded for the old weights, also by a cycle's child (e.g. the base model's difference)
            suffix = f"@{old.merged}"
            loaded = {m for c in self.clients for m in c.models() if m.endswith(suffix)}
            stale += [(None, n) for n in sorted(loaded - keep - {n for _, n in stale})]
        return previous, stale

    def _vllm_accepts(self, name: str, path: Path) -> None:
        """vLLM judges an adapter before it is merged, as before it is served as a LoRA: its rank, its shapes (every
        other model is served as a LoRA difference to it). Loaded under its own name for that moment only."""
        if any(name in c.models() for c in self.clients):
            return
        own = ServedNames(self.router.base_name)  # under its own name
        load_into(self.clients, name, path, names=own)
        for client in self.clients:
            client.unload_adapter_quietly(name, names=own)

    def _use_names(self, names: ServedNames) -> None:
        """From now on every request names its model as `names` says (the registry's and each client's)."""
        self.names = names
        for client in self.clients:
            client.names = names

    def _weights_refused(self, tried: list, old: ServedNames, new: ServedNames, personal) -> None:
        """A server refused (or failed) the new weights: what was loaded for them goes, and every server that may
        hold part of them reloads the weights it had (a reload fails part-way layer by layer)."""
        for p in personal:
            for c in self.clients:
                c.unload_adapter_quietly(p, names=new)
        if old.merged is None:
            back = Path(self.base_model_dir)
        else:
            back = DataLayout(self.data_dir).merged / old.merged
        for client in tried:
            try:
                client.reload_weights(str(back.resolve()))
            except ModelError as e:
                log.error("%s may hold part of the refused weights: reloading %s failed too (%s); restart it",
                          client.base_url, old.merged or "the base model", e)

    def _in_use(self) -> set[str]:
        """The serving names chats may use now: the live shared model's, each live personal adapter's, the base."""
        names = self.names
        return {names.served(m) for m in [*self.router.personal.values(), self.router.current]} | {self.router.base_name}

    def _drain_and_unload_served(self, stale: list[tuple[str | None, str]]) -> None:
        """Unload serving names no longer used (after the requests of their models finished, or the drain
        timeout), and the difference adapters' files of weights no longer merged. A name needed again meanwhile
        (promoted back within the drain) stays."""
        for model, served in stale:
            if model is not None and not self.router.wait_idle(model, self.drain_timeout_s):
                log.warning("%s still had requests after %.0fs; unloading anyway", model, self.drain_timeout_s)
            with self._lock:
                if served in self._in_use() or (self.merged and served.endswith(f"@{self.merged}")):
                    continue
                for client in self.clients:
                    try:
                        client.unload_served(served)
                    except ModelError:
                        pass  # never loaded there (e.g. restarted since)
                shutil.rmtree(DataLayout(self.data_dir).served / served, ignore_errors=True)

    def replica_states(self) -> list:
        """Each replica and the versions it holds (chatfb.serving.replicas.ReplicaState); [] with one server."""
        if self.replicas is None:
            return []
        live = self.store.live_adapter()
        return self.replicas.states(live["name"] if live else None)

    def _drain_and_unload(self, name: str) -> None:
        if not self.router.wait_idle(name, self.drain_timeout_s):
            log.warning("%s still had requests after %.0fs; unloading anyway", name, self.drain_timeout_s)
        if self.router.current != name:
            self.unload(name)

    def promote(self, name: str) -> None:
        a = self.store.adapter(name)
        if a is None:
            raise AdapterError(f"no adapter named {name!r}")
        if a["status"] in ("failed", "training"):
            raise AdapterError(f"adapter {name} is {a['status']} and cannot be promoted")
        if a["owner"] is not None:  # one user's feedback taught it: never everyone's model
            raise AdapterError(f"adapter {name} is a user's personal adapter: it is served only to them")
        self.activate(name)

    # -- personal adapters: one live per owner, served only to that owner --------------------------
    def promote_personal(self, owner: str, name: str) -> None:
        """Serve `owner` (only) their adapter `name`; the one they had is unloaded once its requests finished."""
        a = self.store.adapter(name)
        if a is None or a["owner"] != owner:
            raise AdapterError(f"no personal adapter named {name!r} for this user")
        if a["status"] in ("failed", "training"):
            raise AdapterError(f"adapter {name} is {a['status']} and cannot be promoted")
        with self._lock:
            self._load_everywhere(name)
            previous = self.router.switch_personal(owner, name)
            self.store.set_live_personal(owner, name)
        log.info("user %s now served %s (was %s)", personal_prefix(owner, ""), name, previous or "the shared adapter")
        if previous not in (None, name):
            threading.Thread(target=self._drain_and_unload_personal, args=(owner, previous), daemon=True).start()

    def _drain_and_unload_personal(self, owner: str, name: str) -> None:
        if not self.router.wait_idle(name, self.drain_timeout_s):
            log.warning("%s still had requests after %.0fs; unloading anyway", name, self.drain_timeout_s)
        if self.router.personal.get(owner) != name:
            self.unload(name)

    def remove_personal(self, owner: str) -> list[str]:
        """Forget `owner`'s personal adapters: served the shared one from now, each unloaded from every server,
        its files (adapters/<name>/, work/<name>/) and rows deleted. Returns the names removed."""
        with self._lock:
            self.router.switch_personal(owner, None)
            rows = self.store.personal_adapters(owner)
            layout = DataLayout(self.data_dir)
            for a in rows:
                self.unload(a["name"])
                shared = getattr(self.replicas, "shared_dir", None)  # the replicas' resolver folder, if any
                served = list(layout.served.glob(f"{a['name']}@*"))  # its differences to merged versions
                for folder in [layout.adapters / a["name"], layout.work(a["name"]), *served] + ([shared / a["name"]] if shared else []):
                    shutil.rmtree(folder, ignore_errors=True)
            self.store.delete_personal_adapters(owner)
        return [a["name"] for a in rows]

    def previous_version(self) -> str | None:
        """The version that was live before the current one: the newest promoted before it and retired
        since (not one rolled back). None when the base model serves, or served before the current one."""
        live = self.store.live_adapter()
        if live is None:
            return None
        earlier = [a for a in self.store.adapters() if a["promoted_at"] is not None and a["name"] != live["name"] and a["owner"] is None
                   and a["promoted_at"] <= live["promoted_at"] and a["status"] == "retired"]
        return max(earlier, key=lambda a: a["promoted_at"])["name"] if earlier else None

    def rollback(self) -> str | None:
        """Serve the previous version (`previous_version`, or the base model)."""
        live = self.store.live_adapter()
        if live is None:
            raise AdapterError("nothing to roll back: the base model is serving")
        target = self.previous_version()
        self.activate(target)
        self.store.update_adapter(live["name"], status="rolled_back")
        return target

    def restore(self) -> str | None:
        """After a (re)start: load the live adapter again and route chats to it (merged into the weights again
        when merging), then each user's live personal adapter for them (one that no longer loads leaves its
        user on the shared one)."""
        live = self.store.live_adapter()
        restored = None
        if self.merging and self.clients:  # a (re)started server holds the base weights: say so before anything
            with self._lock:
                self._use_names(ServedNames(self.router.base_name))
        if live is None:
            self.router.switch(self.router.base_name)
        else:
            try:
                self.activate(live["name"])
                restored = live["name"]
            except AdapterError as e:
                log.error("could not restore live adapter %s: %s; serving the base model", live["name"], e)
                self.router.switch(self.router.base_name)
        for owner, name in self.store.live_personal_adapters().items():
            try:
                self.promote_personal(owner, name)
            except AdapterError as e:
                log.error("could not restore personal adapter %s: %s; its user gets the shared one", name, e)
        return restored


def load_into(clients: list[ModelClient], name: str, path: Path, error: type[Exception] | None = None,
              names: ServedNames | None = None) -> None:
    """Load adapter `name` from `path` into every server that does not have it yet: all of them, or none
    (the ones loaded are unloaded again when one refuses, which raises `error`, AdapterError by default).
    `names`: load it for those serving names (default: each client's own, chatfb.serving.merged)."""
    loaded = []
    for client in clients:
        use = client.names if names is None else names
        served = name if use is None else use.served(name)
        try:
            if served not in client.models():
                client.load_adapter(name, str(path), names=use)
                loaded.append(client)
        except ModelError as e:
            for c in loaded:  # leave no server half-promoted
                c.unload_adapter_quietly(name, names=use)
            raise (error or AdapterError)(f"vLLM refused adapter {name} at {client.base_url}: {e}") from None
