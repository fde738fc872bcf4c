"""The data folder's layout, in one place: every file and folder chatfb keeps under CHATFB_DATA_DIR.

    chatfb.duckdb            the store (one writer: the app, or the CLI when no app runs)
    run/control.json         the running app's control API address and token (chatfb.app.control)
    run/browser-state.secret key for the browser's stored session key (chatfb.ui.chat_tab)
    run/hub-names.secret     key for the hashed author names in published datasets (chatfb.learning.hub)
    snapshots/latest.duckdb  the copy CLI readers (export) get while the app owns the store
    adapters/<name>/         trained LoRA adapters (<name>.partial while training)
    work/<name>/             one learning cycle's job: settings, snapshot, training files, result
    work/answers.json        the base model's and the live shared adapter's answers to the cycles' fixed
                             questions, asked once across cycles (chatfb.learning.answers)
    logs/                    nightly.log (the cycle the app runs), vllm.log, vllm-nightly.log; with managed
                             replicas vllm-<i>.log and router.log
    shared-adapters/         managed replicas: adapters copied where every replica's LoRA resolver finds them
    merged/<name>/           the base model's weights with the live shared adapter <name> merged in
    served/<model>@<name>/   a model's LoRA as the difference to the merged adapter <name> (chatfb.serving.merged)
    exports/<time>/          the admin tab's exports
    models/                  the converted embedded model and the Hub cache
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "chatfb.duckdb"

    @property
    def control_file(self) -> Path:
        return self.root / "run" / "control.json"

    @property
    def browser_secret(self) -> Path:
        return self.root / "run" / "browser-state.secret"

    @property
    def hub_name_secret(self) -> Path:
        return self.root / "run" / "hub-names.secret"

    @property
    def latest_snapshot(self) -> Path:
        return self.root / "snapshots" / "latest.duckdb"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def work(self, cycle: str) -> Path:
        return self.root / "work" / cycle

    @property
    def answers(self) -> Path:
        return self.root / "work" / "answers.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nightly_log(self) -> Path:
        return self.logs / "nightly.log"

    def vllm_log(self, role: str | None = None) -> Path:
        """A managed vLLM server's log: vllm.log (the app's), vllm-nightly.log (the server a learning cycle
        run without the app starts), vllm-<i>.log (managed replica i), vllm-bench.log (benchmarks)."""
        return self.logs / (f"vllm-{role}.log" if role is not None else "vllm.log")

    @property
    def router_log(self) -> Path:
        return self.logs / "router.log"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def served(self) -> Path:
        return self.root / "served"

    @property
    def shared_adapters(self) -> Path:
        return self.root / "shared-adapters"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def models(self) -> Path:
        return self.root / "models"
