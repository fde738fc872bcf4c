"""Publishing to the Hugging Face Hub: cleaned feedback as a dataset, adapters as model repos.

Building the files and uploading them are separate steps, so what would be published can be
looked at (and tested) without a network:

    dataset_files(records, out_dir, dismissed)  sft.jsonl, dpo.jsonl, kto.jsonl + a dataset card
    adapter_files(adapter_dir, row, base, out_dir)   the adapter's files + a model card
    push_folder(out_dir, repo_id, repo_type)  create the repo if needed, upload the folder

From the command line: `python -m chatfb export --push-to-hub REPO` and
`python -m chatfb push-adapter NAME REPO` (the token comes from HF_TOKEN).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import Counter
from pathlib import Path

import yaml

from chatfb.learning.exports import export_rows
from chatfb.learning.gate import GateReport
from chatfb.learning.rows import EXPORT_FORMATS, EXPORT_SCHEMAS, write_rows
from chatfb.store.records import FEEDBACK_KINDS, FeedbackRecord
from chatfb.learning.training_data import clean
from chatfb.learning.trust import publishable

CONSENT_NOTE = ("The feedback was given by users of a chatfb app, who were shown a consent notice before "
                "chatting: their messages, ratings, critiques and corrections are logged to improve the model.")

class HubError(RuntimeError):
    """Building or publishing a Hub repo failed; str(e) says why and what to do."""


def _card(meta: dict, body: str) -> str:
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n{body.strip()}\n"


def name_salt(path: Path) -> bytes:
    """The data folder's secret for hashing author names in published datasets (made on first use, mode 0600): the
    same person gets the same hash in every push, and nobody without the file can test a guessed name."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        return name_salt(path)


def dataset_files(records: list[FeedbackRecord], out_dir: Path, dismissed: dict[str, list[str]] | None = None,
                  consent_note: str = CONSENT_NOTE, license: str = "cc-by-4.0", max_chars: int = 8000,
                  reviews: dict[str, str] | None = None, flagged: set[str] | frozenset = frozenset(),
                  rejected: list[tuple[str, str]] = (), salt: bytes | None = None) -> list[Path]:
    """Write the cleaned, PII-scrubbed feedback in TRL formats and a dataset card into out_dir: the rows
    the local export writes (chatfb.learning.exports.export_rows), `dismissed` revisions included, less what
    an admin withheld (chatfb.learning.trust.publishable: flagged authors, rejected rows). Authors are hashes
    keyed with `salt` (`name_salt`; None: a fresh random one, so they link to no other push).

    A format without rows gets no file and no config (the Hub cannot load an empty one)."""
    total = len(records)
    records = publishable(records, reviews or {}, flagged, rejected)
    withheld = total - len(records)
    kept, dropped = clean(records, max_chars, pii=True)
    if withheld:
        dropped = {"withheld_by_the_admin": withheld, **dropped}
    out_dir = Path(out_dir)
    salt = salt if salt is not None else secrets.token_bytes(32)
    rows = {fmt: export_rows(kept, fmt, dismissed, name_salt=salt) for fmt in EXPORT_FORMATS}
    if not any(rows.values()):
        raise HubError(f"nothing to publish: none of the {total} feedback records makes an "
                       f"{'/'.join(EXPORT_FORMATS)} row after cleaning")
    files = [write_rows(r, out_dir / f"{fmt}.jsonl") for fmt, r in rows.items() if r]
    meta = {
        "license": license,
        "task_categories": ["text-generation"],
        "tags": ["chatfb", "feedback", "trl"],
        "configs": [{"config_name": fmt, "data_files": [{"split": "train", "path": f"{fmt}.jsonl"}]}
                    for fmt, r in rows.items() if r],
    }
    kinds = Counter(r.kind for r in kept)
    body = "\n".join([
        "# chatfb feedback",
        "",
        "Chat replies with the feedback users gave on them (👍/👎, critiques, corrections), cleaned and "
        "written in the conversational formats TRL's trainers take. Load one format with "
        '`datasets.load_dataset("<this repo>", "sft")` (or `"dpo"`, `"kto"`).',
        "",
        "## Contents",
        "",
        "| format | rows | schema |",
        "|---|---|---|",
        *(f"| `{fmt}` | {len(r)} | `{EXPORT_SCHEMAS[fmt][0]}` — {EXPORT_SCHEMAS[fmt][1]} |" for fmt, r in rows.items()),
        "",
        "| feedback kind | records |",
        "|---|---|",
        *(f"| {k} | {kinds[k]} |" for k in FEEDBACK_KINDS),
        "",
        f"{len(kept)} of {total} feedback records were kept; dropped: "
        + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in dropped.items()) + ". "
        "Critiques are counted but appear in no format: chatfb turns them into training data with a model.",
        "",
        "## Consent and privacy",
        "",
        consent_note,
        "",
        "E-mail addresses and phone numbers in users' messages were replaced with `[email]` and `[phone]`. "
        "Replies and corrections are published as written (a correction's contact address is the fact it "
        "teaches). No user names, session ids or times are included.",
        "",
        "## License",
        "",
        f"`{license}`.",
    ])
    readme = out_dir / "README.md"
    readme.write_text(_card(meta, body), encoding="utf-8")
    return files + [readme]


def _table(d: dict) -> list[str]:
    if not d:
        return ["(none recorded)"]
    return ["| | |", "|---|---|", *(f"| {k} | {json.dumps(v, default=str)} |" for k, v in d.items())]


def adapter_files(adapter_dir: Path, adapter_row: dict, base_model: str, out_dir: Path) -> list[Path]:
    """Copy a trained adapter (a row of Store.adapters()) into out_dir and write its model card."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise HubError(f"{adapter_dir} holds no adapter_config.json: adapter {adapter_row['name']} "
                       "has no finished files to publish")
    # PEFT's own README.md is a blank template; ours replaces it.
    shutil.copytree(adapter_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    meta = {"library_name": "peft", "tags": ["chatfb", "lora"]}
    if not Path(base_model).expanduser().exists():  # a Hub id; a local folder means nothing on the Hub
        meta = {"base_model": base_model, **meta}
    a = adapter_row
    body = "\n".join([
        f"# {a['name']}",
        "",
        f"A LoRA adapter for `{base_model}`, trained by chatfb on plain-words feedback from the users of a "
        "chat app (corrections, critiques and approved guidelines turned into replies that follow them, 👍 replies), "
        "and scored on held-out feedback "
        "(gate metrics below). Load it with PEFT on top of the base model, or in vLLM with `--enable-lora`.",
        "",
        f"- base model: `{base_model}`",
        f"- parent version: {a.get('parent') or 'none (trained on the base model)'}",
        f"- status when published: {a.get('status')}",
        f"- created: {a.get('created_at')}; promoted: {a.get('promoted_at') or 'never'}",
        "",
        "## Training data (counts)", "", *_table(a.get("data_counts") or {}), "",
        "## Gate metrics (held-out feedback)", "", *_table(dict(GateReport.from_dict(a["metrics"]).card_rows())
                                                           if a.get("metrics") else {}), "",
        "## Recipe", "", *_table(a.get("recipe") or {}), "",
        "## Timings (seconds)", "", *_table(a.get("timings") or {}),
    ])
    (out_dir / "README.md").write_text(_card(meta, body), encoding="utf-8")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def push_folder(folder: Path, repo_id: str, repo_type: str, token: str | None = None, private: bool = True,
                api=None) -> str:
    """Create the repo if needed (private unless told otherwise) and upload the folder; returns the
    commit URL. `private` only applies when the repo is created."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError

    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, token=token,
                                 commit_message="Upload from chatfb")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {401: ": set HF_TOKEN to a valid token with write access",
                403: ": the token may not write to it (it needs write access to that user or organisation)"}
        detail = f": {e.server_message}" if e.server_message else ""
        raise HubError(f"the Hub refused the upload to {repo_type} repo {repo_id} "
                       f"(HTTP {status}{detail}){hint.get(status, '')}") from None
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid repo id (owner/name): {e}") from None
    except (HTTPError, OSError) as e:  # no connection, no token, offline mode
        raise HubError(f"could not upload to {repo_type} repo {repo_id}: {type(e).__name__}: {e}") from None
    return str(getattr(info, "commit_url", "") or "")
