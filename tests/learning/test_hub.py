"""Publishing to the Hub: the exact files that would be uploaded, and the upload against a fake HfApi."""

import importlib
import json
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from chatfb.cli import main as cli
from chatfb.learning.exports import parse_record
from chatfb.learning.hub import CONSENT_NOTE, HubError, adapter_files, dataset_files, push_folder
from chatfb.store.db import Store

FEEDBACK = [
    {"prompt": "I'm ann@example.org, how do I reset my password?", "reply": "Click reset.", "kind": "correction",
     "text": "Open Settings > Password; if stuck, write to support@chatfb.example.", "user": "ann"},
    {"prompt": "Capital of France?", "reply": "Paris.", "kind": "correction", "text": "Paris."},  # SFT, no DPO pair
    {"prompt": "Call me on +44 20 7946 0958 about the order", "reply": "Sure, calling.", "kind": "rating", "rating": -1,
     "user": "bob"},
    {"prompt": "Name a colour", "reply": "Blue.", "kind": "rating", "rating": 1},
    {"prompt": "Summarise the article", "reply": "It is long ...", "kind": "critique", "text": "too long"},
    {"prompt": "Fix this", "reply": "Done.", "kind": "correction", "text": "??"},  # garbage: dropped
]


def add_feedback(store, items=FEEDBACK):
    store.import_feedback([parse_record(r, 8000) for r in items])
    cid = store.create_conversation("s", user_name="cat")
    store.add_message(cid, "user", "Tell me a joke")
    reply = store.add_message(cid, "assistant", "No.")
    store.log_feedback(reply, "implicit", text="regenerated")  # a regenerated reply: a KTO negative
    return store.feedback_records()


def front_matter(card: Path) -> tuple[dict, str]:
    _, meta, body = card.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(meta), body


def test_dataset_files_are_the_cleaned_feedback_and_a_card(store, tmp_path):
    out = tmp_path / "ds"
    files = dataset_files(add_feedback(store), out, max_chars=8000)
    assert sorted(p.name for p in files) == ["README.md", "dpo.jsonl", "kto.jsonl", "sft.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)

    meta, body = front_matter(out / "README.md")
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["chatfb", "feedback", "trl"]
    assert meta["configs"] == [{"config_name": f, "data_files": [{"split": "train", "path": f"{f}.jsonl"}]}
                               for f in ("sft", "dpo", "kto")]
    for line in ("| `sft` | 2 | ", "| `dpo` | 1 | ", "| `kto` | 3 | ", "| correction | 2 |", "| rating | 2 |",
                 "| critique | 1 |", "| implicit | 1 |", "6 of 7 feedback records were kept", "1 empty or garbage"):
        assert line in body, line
    for part in ('"chosen"', '"label"', CONSENT_NOTE, "`cc-by-4.0`"):
        assert part in body, f"the card lacks {part!r}"

    published = "".join((out / f"{f}.jsonl").read_text(encoding="utf-8") for f in ("sft", "dpo", "kto"))
    for private in ("ann@example.org", "7946", '"ann"', "bob", "??"):
        assert private not in published, f"{private!r} was published"
    assert "I'm [email], how do I reset" in published and "Call me on [phone] about" in published, \
        "the text around a scrubbed email or phone number was not kept"
    assert "support@chatfb.example" in published, "the correction's fact was scrubbed"

    sft = load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
    assert sorted(r["messages"][-1]["content"] for r in sft) == [
        "Open Settings > Password; if stuck, write to support@chatfb.example.", "Paris."]
    dpo = load_dataset("json", data_files=str(out / "dpo.jsonl"), split="train")
    assert dpo[0]["rejected"] == [{"role": "assistant", "content": "Click reset."}]
    kto = load_dataset("json", data_files=str(out / "kto.jsonl"), split="train")
    assert sorted((r["completion"][0]["content"], r["label"]) for r in kto) == [
        ("Blue.", True), ("No.", False), ("Sure, calling.", False)]
    # The card's configs are what the Hub uses: the folder loads by config name like the repo would.
    assert len(load_dataset(str(out), "kto", split="train")) == 3


def test_empty_formats_get_no_file_or_config_and_nothing_at_all_is_refused(store, tmp_path):
    records = add_feedback(store, [FEEDBACK[3]])
    files = dataset_files(records, tmp_path / "ds", license="cc0-1.0")
    assert sorted(p.name for p in files) == ["README.md", "kto.jsonl"]
    meta, body = front_matter(tmp_path / "ds" / "README.md")
    assert meta["license"] == "cc0-1.0" and [c["config_name"] for c in meta["configs"]] == ["kto"]
    assert "| `sft` | 0 | " in body
    with pytest.raises(HubError, match="nothing to publish"):
        dataset_files([], tmp_path / "none")


def make_adapter(store, settings, name="chatfb-v0002"):
    folder = settings.data_dir / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights\xff")
    (folder / "chatfb_train.json").write_text("{}")
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    store.add_adapter(name, "chatfb-v0001", "training", name, {"rank": 8, "epochs": 3.0})
    store.update_adapter(name, status="candidate", metrics={"candidate_rougeL": 0.61, "control_agreement": 0.93},
                         data_counts={"train_examples": 12, "dpo_pairs": 4}, timings={"train_s": 81.5, "total_s": 140.2})
    return folder, store.adapter(name)


def test_adapter_files_copy_the_adapter_and_write_a_model_card(store, settings, tmp_path):
    folder, row = make_adapter(store, settings)
    files = adapter_files(folder, row, "HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "up")
    assert [p.name for p in files] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chatfb_train.json"]
    assert (tmp_path / "up" / "adapter_model.safetensors").read_bytes() == b"\x00weights\xff"
    meta, body = front_matter(tmp_path / "up" / "README.md")
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "peft", "tags": ["chatfb", "lora"]}
    for text in ("# chatfb-v0002", "parent version: chatfb-v0001", "status when published: candidate",
                 "| ROUGE-L | 0.61 |", "| control agreement | 0.93 |", "| train_examples | 12 |",
                 "| dpo_pairs | 4 |", "| train_s | 81.5 |", "| rank | 8 |", "critiques and approved guidelines turned into"):
        assert text in body, text
    assert "Model Card for Model ID" not in body  # PEFT's template is replaced

    # A local base model folder means nothing on the Hub: named in the body, not in the metadata.
    meta, _ = front_matter(adapter_files(folder, row, str(tmp_path), tmp_path / "up2")[0])
    assert "base_model" not in meta
    (folder / "adapter_config.json").unlink()
    with pytest.raises(HubError, match="no adapter_config.json"):
        adapter_files(folder, row, "b", tmp_path / "up3")


class FakeHubApi:
    """Records create_repo / upload_folder calls (with the folder's files at upload time)."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail:
            raise self.fail

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, kw, files))
        return type("CommitInfo", (), {"commit_url": f"fake://{repo_id}/commit/1"})()


def test_push_folder_creates_the_repo_then_uploads_the_folder(store, tmp_path):
    files = dataset_files(add_feedback(store), tmp_path / "ds")
    api = FakeHubApi()
    assert push_folder(tmp_path / "ds", "ann/chatfb-feedback", "dataset", token="t", api=api) == "fake://ann/chatfb-feedback/commit/1"
    (op1, repo1, kw1), (op2, repo2, kw2, uploaded) = api.calls
    assert (op1, repo1, op2, repo2) == ("create_repo", "ann/chatfb-feedback", "upload_folder", "ann/chatfb-feedback")
    assert kw1 == {"repo_type": "dataset", "private": True, "exist_ok": True, "token": "t"}
    assert kw2["repo_type"] == "dataset" and kw2["token"] == "t"
    assert uploaded == {p.name: p.read_bytes() for p in files}

    push_folder(tmp_path / "ds", "ann/m", "model", private=False, api=(api := FakeHubApi()))
    assert api.calls[0][2]["private"] is False and api.calls[0][2]["repo_type"] == "model"


def test_hub_errors_become_a_short_hub_error(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError, Response

    http = importlib.import_module(Response.__module__.split(".")[0])  # the HTTP client huggingface_hub uses
    response = http.Response(401, request=http.Request("POST", "http://hub.invalid/api/repos/create"))
    api = FakeHubApi(fail=HfHubHTTPError("401 Unauthorized", response=response,
                                          server_message="Invalid credentials in Authorization header"))
    with pytest.raises(HubError) as e:
        push_folder(tmp_path, "ann/fb", "dataset", api=api)
    assert str(e.value) == ("the Hub refused the upload to dataset repo ann/fb (HTTP 401: Invalid credentials in "
                            "Authorization header): set HF_TOKEN to a valid token with write access")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert [c[0] for c in api.calls] == ["create_repo"]  # nothing uploaded after a refusal

    # A real HfApi refuses a malformed repo id before any request is made.
    with pytest.raises(HubError, match="'not a repo!' is not a valid repo id"):
        push_folder(tmp_path, "not a repo!", "model", token="t")


def test_cli_pushes_feedback_and_adapters(settings, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    with Store(settings.db_path) as s:
        paris = next(r for r in add_feedback(s) if r.text == "Paris.")
        make_adapter(s, settings)
        # a revision the user dismissed: a negative in the local export, so in the published dataset too
        s.add_candidates([{"feedback_id": paris.feedback_id, "message_id": paris.message_id, "origin": "inloop",
                           "text": "Lyon.", "verdict": "ok", "status": "rejected"}])
    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: apis.append(FakeHubApi()) or apis[-1])
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("HF_TOKEN", "secret")

    assert cli(["export", "--push-to-hub", "ann/fb", "--public", "--license", "mit"]) == 0
    (_, repo, kw), (_, _, _, uploaded) = apis[0].calls
    assert repo == "ann/fb" and kw == {"repo_type": "dataset", "private": False, "exist_ok": True, "token": "secret"}
    assert sorted(uploaded) == ["README.md", "dpo.jsonl", "kto.jsonl", "sft.jsonl"]
    assert b"license: mit" in uploaded["README.md"], "the --license flag did not reach the card"
    out = capsys.readouterr().out
    assert "pushed 4 files to dataset repo ann/fb" in out, out
    assert b'"chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]' \
        in uploaded["dpo.jsonl"]
    assert b'"completion": [{"role": "assistant", "content": "Lyon."}], "label": false' in uploaded["kto.jsonl"]
    assert not list(settings.data_dir.glob("hub-*")), "the build folder was left behind"

    assert cli(["push-adapter", "chatfb-v0002", "ann/adapter"]) == 0
    (_, repo, kw), (_, _, _, uploaded) = apis[1].calls
    assert repo == "ann/adapter" and kw["repo_type"] == "model" and kw["private"] is True
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chatfb_train.json"]
    assert b"base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in uploaded["README.md"], "the card does not name the base model"

    capsys.readouterr()
    assert cli(["push-adapter", "chatfb-v0099", "ann/adapter"]) == 2
    assert capsys.readouterr().err.startswith("error: no adapter 'chatfb-v0099'")
    assert cli(["export", "--format", "sft"]) == 2
    assert "error: export needs --format and --out" in capsys.readouterr().err


def test_the_pushed_dataset_leaves_out_what_the_admin_withheld_and_hashes_names_with_a_secret(
        settings, monkeypatch, capsys):
    """A flagged author's rows and a rejected row (and the same text sent again) are never published; authors are
    keyed hashes: a bare sha256 of a guessed name finds nobody, and the key stays in the data folder (0600)."""
    import hashlib

    import huggingface_hub

    from chatfb.learning.trust import review_content

    with Store(settings.db_path) as s:
        s.import_feedback([parse_record(dict(r, user=u), 8000) for r, u in (
            (FEEDBACK[1], "ann"), (FEEDBACK[3], "ann"),
            ({"prompt": "Who painted the Mona Lisa?", "reply": "Leonardo.", "kind": "correction",
              "text": "Vincent van Gogh painted it."}, "mallory"),
            ({"prompt": "What is the capital of Australia?", "reply": "Canberra.", "kind": "correction",
              "text": "Sydney is the capital."}, "eve"),
            ({"prompt": "What is the capital of Australia?", "reply": "Hm.", "kind": "correction",
              "text": "Sydney is the capital."}, "eve2"))])
        records = s.feedback_records()
        sydney = next(r for r in records if r.user_name == "eve")
        s.set_review([sydney.feedback_id], "rejected", {sydney.feedback_id: review_content(sydney)})
        s.flag_author("mallory", "spam")
    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: apis.append(FakeHubApi()) or apis[-1])
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    assert cli(["export", "--push-to-hub", "ann/fb"]) == 0
    (_, _, _, uploaded) = apis[0].calls[1]
    published = b"".join(uploaded.values()).decode()
    assert "Paris." in published and "Blue." in published
    assert "van Gogh" not in published and "Sydney" not in published, "withheld feedback was published"
    assert "3 withheld by the admin" in uploaded["README.md"].decode()  # mallory's row, the rejected one and its twin
    authors = {json.loads(line)["author"] for line in uploaded["sft.jsonl"].decode().splitlines()}
    assert len(authors) == 1 and "user-" + hashlib.sha256(b"ann").hexdigest()[:12] not in authors
    secret = settings.data_dir / "run" / "hub-names.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert cli(["export", "--push-to-hub", "ann/fb"]) == 0  # the same key: the same hash in every push
    assert {json.loads(line)["author"] for line in apis[1].calls[1][3]["sft.jsonl"].decode().splitlines()} == authors
