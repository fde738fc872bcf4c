"""`python -m chatfb COMMAND`: serve, import-feedback, export, nightly, adapters, push-adapter, delete-user,
guidelines, review, api-key, settings (`python -m chatfb COMMAND --help` for each; docs/formats.md lists them).

Every command that touches data works whether or not the app is running: with the app up it is
carried out by the app (see chatfb.app.control), otherwise on the DuckDB file directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from chatfb.config import add_settings_flags, settings_from_args, settings_table, setup_logging

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A command failed for a reason the user can act on (printed without a trace)."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chatfb", description="chatfb: a chat app that learns from feedback")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the app (same as python app.py)")
    add_settings_flags(serve)

    imp = sub.add_parser("import-feedback", help="import feedback records from a JSONL file")
    imp.add_argument("file", type=Path)
    imp.add_argument("--trusted", action="store_true",
                     help="the operator vouches for the file: it may train the shared adapter without agreement or review")
    add_settings_flags(imp)

    exp = sub.add_parser("export", help="export TRL-ready training files, or publish them to the Hugging Face Hub")
    exp.add_argument("--format", choices=("sft", "dpo", "kto"))
    exp.add_argument("--out", type=Path, help="output folder")
    exp.add_argument("--file-format", default="jsonl", choices=("jsonl", "parquet"))
    exp.add_argument("--push-to-hub", metavar="REPO", help="publish every format and a dataset card to this dataset repo")
    exp.add_argument("--license", default="cc-by-4.0", help="license of the published dataset")
    add_hub_flags(exp)
    add_settings_flags(exp)

    nightly = sub.add_parser("nightly", help="run one learning cycle now")
    nightly.add_argument("--no-promote", action="store_true", help="train and gate, but do not promote")
    add_settings_flags(nightly)

    ad = sub.add_parser("adapters", help="list, promote or roll back adapter versions, or show what one learnt")
    ad.add_argument("action", choices=("list", "promote", "rollback", "uptake"),
                    help="uptake: which trained feedback items NAME (default: the live adapters) learnt, per item "
                         "and per cluster of similar questions")
    ad.add_argument("name", nargs="?")
    add_settings_flags(ad)

    pa = sub.add_parser("push-adapter", help="publish an adapter version and its model card to the Hugging Face Hub")
    pa.add_argument("name")
    pa.add_argument("repo", help="model repo id, owner/name")
    add_hub_flags(pa)
    add_settings_flags(pa)

    du = sub.add_parser("delete-user", help="delete every conversation and feedback row of one user")
    du.add_argument("user")
    add_settings_flags(du)

    gl = sub.add_parser("guidelines", help="list, add, approve or retire guidelines (standing preferences)")
    gl.add_argument("action", choices=("list", "add", "approve", "retire"))
    gl.add_argument("value", nargs="?", help="the guideline's text (add) or its id (approve, retire)")
    add_settings_flags(gl)

    ak = sub.add_parser("api-key", help="create, list or revoke a user's keys for the OpenAI-compatible API (docs/api.md)")
    ak.add_argument("action", choices=("create", "list", "revoke"))
    ak.add_argument("user", nargs="?", help="whose key (list: all users' keys when left out)")
    ak.add_argument("--id", dest="key_id", help="revoke only this key (an id from `list`); default: all of the user's")
    add_settings_flags(ak)

    rv = sub.add_parser("review", help="the review queue: feedback that may teach everyone only once an admin approves it")
    rv.add_argument("action", choices=("list", "approve", "reject", "flag", "unflag"),
                    help="list what waits; approve or reject feedback ids; flag or unflag an author (nothing of a "
                         "flagged author trains)")
    rv.add_argument("values", nargs="*", help="feedback ids (approve, reject), or one author as `review list` shows it")
    add_settings_flags(rv)

    sub.add_parser("settings", help="print the settings table (env vars, flags, defaults)")
    return p


def add_hub_flags(parser: argparse.ArgumentParser) -> None:
    vis = parser.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True,
                     help="create the Hub repo private (default; an existing repo keeps its visibility)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the Hub repo public")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging()
    if args.command == "settings":
        print(settings_table())
        return 0
    try:
        settings = settings_from_args(args)
        return COMMANDS[args.command](settings, args) or 0
    except OSError as e:  # disk full, unreadable file, ...: the message, not a trace
        print(f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - user errors in one line; anything else is a bug: keep its trace
        if isinstance(e, user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        log.exception("%s failed", args.command)
        print(f"error: {args.command} failed: {type(e).__name__}: {e} (the trace is above)", file=sys.stderr)
        return 1


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to do: printed without a trace."""
    from chatfb.serving.adapters import AdapterError
    from chatfb.config import SettingsError
    from chatfb.app.admin import AdminError
    from chatfb.learning.exports import BadImportFile
    from chatfb.learning.gate import GateError
    from chatfb.learning.hub import HubError
    from chatfb.store.records import StoreError

    return CommandError, SettingsError, BadImportFile, AdapterError, AdminError, GateError, HubError, StoreError


def cmd_serve(settings, args) -> int:
    from chatfb.serve import serve

    serve(settings)
    return 0


def cmd_import(settings, args) -> int:
    from chatfb.learning.exports import parse_jsonl

    records = parse_jsonl(args.file, settings.max_feedback_chars)  # raises with every bad line named
    backend = open_admin(settings)
    try:
        n = backend.import_feedback([{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                                      if v is not None} for r in records], trusted=args.trusted)
    finally:
        backend.close()
    print(f"imported {n} feedback records" + (" (trusted: they may train the shared adapter)" if args.trusted else ""))
    return 0


def snapshot_records(settings, with_scopes: bool = True):
    """(feedback records, dismissed revisions by message id, scope of each row under the trust policy or None
    without `with_scopes`, the admin's decisions as chatfb.learning.hub.dataset_files takes them, uptake rows)
    read from a fresh, consistent snapshot (the app writes it when running)."""
    from chatfb.store.db import Store

    backend = open_admin(settings)
    try:
        path = backend.snapshot()
    finally:
        backend.close()
    from chatfb.learning.training_data import shared_scopes

    with Store(path, read_only=True) as snap:
        records, dismissed, reviews, flagged, rejected = (snap.feedback_records(), snap.rejected_candidates(),
                                                          snap.reviews(), snap.flagged_authors(), snap.rejected_content())
        checks = snap.uptake()
    scopes = shared_scopes(records, settings, reviews, flagged, rejected) if with_scopes else None
    return records, dismissed, scopes, {"reviews": reviews, "flagged": flagged, "rejected": rejected}, checks


def cmd_export(settings, args) -> int:
    from chatfb.learning.exports import export
    from chatfb.learning.hub import dataset_files, name_salt

    if (args.format is None) != (args.out is None) or not (args.format or args.push_to_hub):
        raise CommandError("export needs --format and --out, or --push-to-hub REPO (or all three)")
    # the scopes need the embedding model: only the files written here carry them (a Hub dataset says "personal")
    records, dismissed, scopes, decided, checks = snapshot_records(settings, with_scopes=bool(args.format))
    if args.format:
        path, n = export(records, args.format, args.out, args.file_format, dismissed, scopes, uptake_rows=checks)
        print(f"wrote {n} {args.format} rows to {path}")
    if args.push_to_hub:
        push_built(settings, args.push_to_hub, "dataset", args.private,
                   lambda d: dataset_files(records, d, dismissed, license=args.license, max_chars=settings.max_feedback_chars,
                                           salt=name_salt(settings.layout.hub_name_secret), **decided))
    return 0


def push_built(settings, repo: str, repo_type: str, private: bool, build) -> None:
    """Build the files into a temp folder under the data dir with `build(folder)`, then upload it."""
    from chatfb.learning.hub import push_folder

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hub-", dir=settings.data_dir) as folder:
        files = build(Path(folder))
        url = push_folder(Path(folder), repo, repo_type, token=os.environ.get("HF_TOKEN") or None, private=private)
    print(f"pushed {len(files)} files to {repo_type} repo {repo} {url}".rstrip())


def open_admin(settings):
    """The admin operations (chatfb.app.admin): the running app's, through its control API, or this
    process's own on the store file. Close it when done."""
    from chatfb.app.control import open_backend

    return open_backend(settings.data_dir, base_model(settings), settings)


def base_model(settings) -> str | None:
    """The model adapters are checked against without the app: the managed server's, as the app checks
    (an external server may serve another model than CHATFB_MODEL names)."""
    return settings.model if settings.managed else None


def cmd_nightly(settings, args) -> int:
    """One learning cycle now, run by whoever owns the store: the running app (its log is copied to
    stderr meanwhile), or this process. The cycle's summary (JSON) goes to stdout."""
    import json

    from chatfb.app.control import RemoteBackend
    from chatfb.learning.cycle import run_cycle

    backend = open_admin(settings)
    try:
        if isinstance(backend, RemoteBackend):
            result = cycle_in_app(backend, settings, promote=not args.no_promote)
        else:  # the child's log to our stderr (file descriptor 2: it is another process's output)
            result = run_cycle(backend.store, backend.registry, settings, not args.no_promote, output=2).__dict__
    finally:
        backend.close()
    print(json.dumps(result, indent=2, default=str))
    return 0 if any_job_ok(result) else 1


def any_job_ok(result: dict) -> bool:
    """Did any job of the cycle run to a gate decision: the shared one or a personal one? A cycle whose shared job
    had nothing vouched for to train while personal adapters trained succeeded; its JSON says what each did."""
    return bool(result["ok"] or any(p.get("ok") for p in result.get("personal") or []))


def cycle_in_app(backend, settings, promote: bool) -> dict:
    """Start a cycle in the running app with these settings, copy its log to stderr until it finishes,
    and return its summary."""
    from chatfb.config import settings_to_json
    from chatfb.serving.wait import wait_until

    number = backend.start_cycle(settings_to_json(settings), promote)
    log_path, copied = settings.layout.nightly_log, 0

    def finished() -> bool:
        nonlocal copied
        done = backend.cycle_status()["finished"] >= number  # asked first: the log is then complete
        try:
            with open(log_path, "rb") as fh:
                fh.seek(copied)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        copied += len(chunk)
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        return done

    wait_until(finished, None, every_s=2.0)
    return backend.cycle_status()["result"]


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def cmd_adapters(settings, args) -> int:
    from chatfb.learning.gate import GateReport

    backend = open_admin(settings)
    try:
        if args.action == "list":
            for a in backend.adapters():
                m = GateReport.from_dict(a["metrics"])
                carries = f" [carries {a['deleted_users']} deleted user(s)' data]" if a.get("deleted_users") else ""
                print(f"{a['name']:<14} {a['status']:<11} parent={a['parent'] or 'base':<14} "
                      f"rougeL={_or_dash(m.candidate_rougeL)} control={_or_dash(m.control_agreement)} {a['error'] or ''}"
                      f"{carries}")
        elif args.action == "promote":
            if not args.name:
                raise CommandError("adapters promote needs a NAME")
            backend.promote(args.name)
            print(f"promoted {args.name}")
        elif args.action == "uptake":
            print_uptake(backend.uptake(args.name))
        else:
            target = backend.rollback()
            print(f"rolled back; now serving {target or 'the base model'}")
    finally:
        backend.close()
    return 0


def print_uptake(report: dict) -> None:
    """AdminService.uptake's report as text: the share learnt, per cluster, then per item."""
    if not report["checked"]:
        print("no uptake checked yet (a cycle checks what it trained on when it promotes an adapter)")
        return
    print(f"learned {report['learned']} of {report['checked']} checked items ({report['share']:.0%})")
    print("\nper cluster (similar questions):")
    for c in report["clusters"]:
        print(f"  {c['learned']}/{c['items']} ({c['share']:.0%})  {c['topic'][:80]}")
    print("\nper item:")
    for i in report["items"]:
        print(f"  {'learned    ' if i['learned'] else 'not learned'} {i['adapter']:<24} {i['feedback_kind']:<18} "
              f"{i['measure']}={_or_dash(i['score'])}  {i['feedback_id']}  {i['question'][:60]}")


def cmd_push_adapter(settings, args) -> int:
    from chatfb.serving.adapters import confined_path
    from chatfb.learning.hub import adapter_files
    from chatfb.serving.model_files import EMBEDDED_HUB_ID

    backend = open_admin(settings)
    try:
        row = next((a for a in backend.adapters() if a["name"] == args.name), None)
    finally:
        backend.close()
    if row is None or not row["path"]:
        raise CommandError(f"no adapter {args.name!r} with files (see: python -m chatfb adapters list)")
    if row.get("owner"):  # trained on one user's own feedback: it is theirs, not a model to publish
        raise CommandError(f"adapter {args.name} is a user's personal adapter and is not published")
    base = EMBEDDED_HUB_ID if settings.model == "embedded" else settings.model
    push_built(settings, args.repo, "model", args.private,
               lambda d: adapter_files(confined_path(settings.data_dir, row["path"]), row, base, d))
    return 0


def cmd_delete_user(settings, args) -> int:

    backend = open_admin(settings)
    try:
        n = backend.delete_user(args.user)
        carrying = [a["name"] for a in backend.adapters() if a.get("deleted_users")]
    finally:
        backend.close()
    print(f"deleted {n} conversations of {args.user!r}, their feedback and their rows in every training and export file")
    if carrying:
        print(f"adapters trained on deleted users' rows (they carry them until the next cycle retrains): "
              f"{', '.join(carrying)}")
    return 0


def cmd_guidelines(settings, args) -> int:
    """Guidelines for everyone: `add` makes an approved one at once (the operator is the admin);
    `approve` approves a user's suggestion; `retire` takes any guideline out of the prompts."""

    if args.action != "list" and not (args.value or "").strip():
        raise CommandError(f"guidelines {args.action} needs " + ("TEXT" if args.action == "add" else "an ID"))
    backend = open_admin(settings)
    try:
        if args.action == "list":
            for g in backend.guidelines():
                print(f"{g['id']}  {g['scope']:<6} {g['status']:<8} {g['user_name'] or '-':<12} {g['text']}")
        elif args.action == "add":
            print(f"added guideline {backend.add_guideline(args.value)} for everyone")
        else:
            backend.set_guideline_status(args.value.strip(), "active" if args.action == "approve" else "retired")
            print(f"{args.action}d guideline {args.value.strip()}")
    finally:
        backend.close()
    return 0


def cmd_api_key(settings, args) -> int:
    """Keys for the OpenAI-compatible API: `create` prints the new key once (only its hash is stored)."""
    if args.action != "list" and not (args.user or "").strip():
        raise CommandError(f"api-key {args.action} needs a USER")
    backend = open_admin(settings)
    try:
        if args.action == "create":
            made = backend.create_api_key(args.user)
            print(f"API key for {made['user_name']!r} (id {made['id']}); it is shown only now, keep it secret:")
            print(made["key"])
        elif args.action == "list":
            for k in backend.api_keys(args.user):
                state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "live"
                print(f"{k['id']}  {k['user_name']:<16} {k['prefix']}…  created {k['created_at']}  {state}")
        else:
            n = backend.revoke_api_keys(args.user.strip(), args.key_id)
            print(f"revoked {n} key{'s' if n != 1 else ''} of {args.user.strip()!r}")
    finally:
        backend.close()
    return 0


def cmd_review(settings, args) -> int:
    """The admin's review queue (chatfb.learning.trust): what waits, grouped by what it would teach, and the
    decisions on it. An approved row may train the shared adapter; a rejected one never does, nor does any
    other row on its question unless approved itself."""
    from chatfb.config import settings_to_json

    values = [v.strip() for v in args.values if v.strip()]
    if args.action != "list" and not values:
        raise CommandError(f"review {args.action} needs " + ("feedback IDS" if args.action in ("approve", "reject")
                                                              else "an AUTHOR (a user name or anon-... id)"))
    backend = open_admin(settings)
    try:
        if args.action == "list":
            from chatfb.learning.trust import Policy

            print(f"trust policy: {Policy.from_settings(settings).describe()}")
            groups = backend.review_queue(settings_to_json(settings))
            if not groups:
                print("nothing waits for review")
            for g in groups:
                print(f"\n== would teach ({g['teaching']}, {len(g['rows'])} row(s) from {g['authors']} author(s), "
                      f"{g['users']} counted as agreeing): "
                      f"{g['question'][:80]!r} -> {g['teaches'][:120]!r}")
                for r in g["rows"]:
                    print(f"  {r['id']}  {r['created_at']}  {r['author']:<18} {r['feedback_kind']:<18} "
                          f"{r['question'][:50]!r} -> {r['text'][:60]!r}")
        elif args.action in ("approve", "reject"):
            n = backend.review(values, "approved" if args.action == "approve" else "rejected")
            print(f"{args.action}d {n} feedback row(s); the next learning cycle follows the decision")
        elif args.action == "flag":
            backend.flag_author(values[0], " ".join(values[1:]))
            print(f"flagged {values[0]}: nothing of theirs trains from the next learning cycle on")
        else:
            backend.unflag_author(values[0])
            print(f"unflagged {values[0]}")
    finally:
        backend.close()
    return 0


COMMANDS = {"api-key": cmd_api_key, "guidelines": cmd_guidelines, "serve": cmd_serve, "import-feedback": cmd_import,
            "export": cmd_export, "nightly": cmd_nightly, "adapters": cmd_adapters, "push-adapter": cmd_push_adapter,
            "delete-user": cmd_delete_user, "review": cmd_review}
