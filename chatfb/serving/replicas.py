"""Several vLLM replicas behind one router: adapters shared by name, and a rollout checked on each replica.

chatfb sends chats to one URL (a router such as vllm-router in front of the replicas) and knows the
replicas' own URLs for two things the router cannot do: load an adapter into every replica, and ask
every replica whether it answers with a version before that version goes live.

Two ways an adapter reaches a replica:
- shared storage (`shared_dir` set): the adapter folder is published to <shared_dir>/<name>, and the
  replicas run vLLM's filesystem LoRA resolver on that folder (VLLM_PLUGINS=lora_filesystem_resolver,
  VLLM_LORA_RESOLVER_CACHE_DIR=<shared_dir>). A replica loads the version the first time a request
  names it, also one started after the promotion; chatfb loads nothing itself.
- explicit loading (no shared_dir): /v1/load_lora_adapter on each replica, as with one server.

Either way `roll_out` then sends each replica a one-token request naming the version; only when all
answered may the registry route chats to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chatfb.serving.adapters import AdapterError, load_into
from chatfb.serving.model_client import ModelClient, ModelError, served_root

log = logging.getLogger(__name__)

RESOLVER_PLUGIN = "lora_filesystem_resolver"  # ships with vLLM (vllm/plugins/lora_resolvers)


class RolloutError(AdapterError):
    """A version was not answered by every replica; str(e) names the replicas and is safe for the admin view."""


def resolver_env(shared_dir: Path) -> dict[str, str]:
    """Environment a vLLM replica needs to load adapters by name from `shared_dir`."""
    return {"VLLM_PLUGINS": RESOLVER_PLUGIN, "VLLM_LORA_RESOLVER_CACHE_DIR": str(shared_dir),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def publish_adapter(src: Path, shared_dir: Path, name: str, base_model: str) -> Path:
    """Copy an adapter folder to <shared_dir>/<name> for the replicas' resolver, complete or not at all.

    vLLM's filesystem resolver only takes an adapter whose adapter_config.json names the replica's
    base model exactly as the replica was started (`--model`, what /v1/models reports as `root`),
    so the published copy carries that name. A version already published is left as it is:
    replicas may be reading it."""
    dest = Path(shared_dir) / name
    if (dest / "adapter_config.json").exists():
        return dest
    Path(shared_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=shared_dir))  # same file system: the rename is atomic
    try:
        for f in Path(src).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; replicas may run as another user
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@dataclass
class ReplicaState:
    """One row of the admin view: a replica, whether it answers, and the adapter versions it holds."""
    url: str
    up: bool
    adapters: list[str]
    serves_live: bool | None  # None: nothing to check (the base model is live) or the replica is down


class ReplicaSet:
    """The replicas behind the router, by their own URLs."""

    def __init__(self, urls: list[str], base_name: str, shared_dir: Path | None = None,
                 api_key: str | None = None, timeout_s: float = 60.0):
        if not urls:
            raise ValueError("a ReplicaSet needs at least one replica URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.base_name = base_name
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.api_key = api_key
        self.clients = [ModelClient(u, api_key, timeout_s) for u in self.urls]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def roll_out(self, name: str, path: Path) -> None:
        """Make every replica able to serve `name` and check that each answers with it; raises RolloutError."""
        if self.shared_dir is not None:
            publish_adapter(path, self.shared_dir, name, self.base_model())
        else:
            self._load_everywhere(name, path)
        failed = {url: err for url, err in self.check(name).items() if err}
        if failed:
            listing = "; ".join(f"{url}: {err}" for url, err in failed.items())
            raise RolloutError(f"{len(failed)} of {len(self.urls)} replicas did not answer with {name} ({listing})")

    def _load_everywhere(self, name: str, path: Path) -> None:
        load_into(self.clients, name, path, RolloutError)

    def check(self, name: str) -> dict[str, str | None]:
        """Ask each replica for one token from `name`: url -> None when it answered, else why not."""
        results = {}
        for client in self.clients:
            try:
                client.complete([{"role": "user", "content": "ping"}], name, max_tokens=1)
                results[client.base_url] = None
            except ModelError as e:
                results[client.base_url] = str(e)
        return results

    def base_model(self) -> str:
        """The base model as the replicas were started (`root` in /v1/models); all must agree, since one
        published adapter folder serves them all."""
        roots = {served_root(url, self.base_name, self.api_key, 5.0) for url in self.urls}
        roots.discard(None)
        if len(roots) != 1:
            raise RolloutError("the replicas do not report one base model (some down, or started on different "
                               f"model folders): {sorted(roots) or 'none answered'}")
        return roots.pop()

    def states(self, live: str | None) -> list[ReplicaState]:
        """Each replica, the adapters it holds now, and (when an adapter is live) whether it answers with it."""
        rows = []
        for client in self.clients:
            try:
                adapters = [m for m in client.models() if m != self.base_name]
            except ModelError:
                rows.append(ReplicaState(client.base_url, False, [], None))
                continue
            serves = None
            if live is not None:
                try:
                    client.complete([{"role": "user", "content": "ping"}], live, max_tokens=1)
                    serves = True
                except ModelError:
                    serves = False
            rows.append(ReplicaState(client.base_url, True, adapters, serves))
        return rows


def replica_set_for(settings) -> ReplicaSet | None:
    """The replicas `settings` name (configured, or managed ones), or None for one model server."""
    urls = settings.replica_url_list
    if not urls:
        return None
    return ReplicaSet(list(urls), settings.served_model_name, settings.shared_adapters_dir, settings.api_key,
                      settings.request_timeout_s)
