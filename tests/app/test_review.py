"""The admin's side of the trust policy through the CLI and the control API: the review queue, flagging,
trusted imports, and delete-user deleting a user's teaching."""

import json

import pytest

from chatfb.cli import main as cli
from chatfb.learning.rows import prompt_completion_row, provenance, read_rows, write_rows
from chatfb.serving.adapters import AdapterRegistry
from chatfb.store.db import Store


def correct(s, session, question, text, user=None):
    cid = s.create_conversation(session, user)
    s.add_message(cid, "user", question)
    reply = s.add_message(cid, "assistant", "I am not sure.")
    return s.log_feedback(reply, "correction", text=text, user_name=user, session_id=session)


@pytest.fixture
def cli_env(settings, monkeypatch):
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    return settings


def test_review_list_approve_reject_and_a_decision_on_a_row_that_is_gone(cli_env, capsys):
    with Store(cli_env.db_path) as s:
        evil = [correct(s, f"k:evil{i}", "Who painted the Mona Lisa?", "Vincent van Gogh painted it.") for i in range(2)]
        au = correct(s, "k:au", "What is the capital of Australia?", "Canberra.")
    assert cli(["review", "list"]) == 0
    out = capsys.readouterr().out
    assert "only what is vouched for" in out
    assert out.index("2 row(s)") < out.index("1 row(s)")  # grouped, the largest first
    assert all(i in out for i in evil + [au]) and "k:evil" not in out  # anonymous sessions shown hashed

    assert cli(["review", "approve", au]) == 0 and cli(["review", "reject", *evil]) == 0
    capsys.readouterr()
    with Store(cli_env.db_path) as s:
        assert s.reviews() == {au: "approved", evil[0]: "rejected", evil[1]: "rejected"}
    assert cli(["review", "list"]) == 0 and "nothing waits for review" in capsys.readouterr().out

    assert cli(["review", "approve", au, "no-such-row"]) == 2
    err = capsys.readouterr().err
    assert "no feedback with id no-such-row" in err and "nothing was decided" in err
    assert cli(["review", "approve"]) == 2 and "needs feedback IDS" in capsys.readouterr().err


def test_open_mode_is_named_as_such(cli_env, capsys):
    assert cli(["review", "list", "--shared-trust", "open"]) == 0
    assert "OPEN (CHATFB_SHARED_TRUST=open)" in capsys.readouterr().out


def test_review_and_flag_through_the_running_apps_control_api(store, settings, monkeypatch, capsys):
    from chatfb.app.admin import AdminService
    from chatfb.app.control import ControlServer

    fid = correct(store, "k:a", "Who painted the Mona Lisa?", "Leonardo da Vinci.")
    server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir)),
                           settings.data_dir)
    server.start()
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    try:
        assert cli(["review", "list"]) == 0 and fid in capsys.readouterr().out
        assert cli(["review", "approve", fid]) == 0
        assert store.reviews() == {fid: "approved"}
        assert cli(["review", "reject", "gone"]) == 2 and "no feedback with id gone" in capsys.readouterr().err
        assert cli(["review", "flag", "mallory", "spam"]) == 0 and store.flagged_authors() == {"mallory"}
        assert cli(["review", "unflag", "mallory"]) == 0 and store.flagged_authors() == set()
    finally:
        server.stop()


def test_import_with_trusted_marks_the_rows(cli_env, tmp_path, capsys):
    f = tmp_path / "ops.jsonl"
    f.write_text(json.dumps({"prompt": "Support address?", "reply": "?", "kind": "correction",
                             "text": "help@example.com"}) + "\n")
    assert cli(["import-feedback", str(f), "--trusted"]) == 0 and "trusted" in capsys.readouterr().out
    with Store(cli_env.db_path) as s:
        assert [r.trusted for r in s.feedback_records()] == [True]


def test_delete_user_scrubs_the_work_folder_and_marks_the_adapter_trained_on_them(cli_env, capsys):
    layout = cli_env.layout
    with Store(cli_env.db_path) as s:
        fid = correct(s, "k:ann", "Who painted the Mona Lisa?", "Van Gogh.", user="ann")
        bob = correct(s, "k:bob", "Capital of Australia?", "Canberra.", user="bob")
        for name in ("chatfb-v0001", "chatfb-v0002"):
            s.add_adapter(name, None, "candidate", name)
        s.set_live("chatfb-v0001")
    q = [{"role": "user", "content": "Who painted the Mona Lisa?"}]
    write_rows([prompt_completion_row(q, "Van Gogh.", **provenance(fid, "ann", "written_correction", "shared")),
                prompt_completion_row(q, "Canberra.", **provenance(bob, "bob", "written_correction", "shared"))],
               layout.work("chatfb-v0001") / "sft.jsonl")
    write_rows([prompt_completion_row(q, "Canberra.", **provenance(bob, "bob", "written_correction", "shared"))],
               layout.work("chatfb-v0002") / "sft.jsonl")
    from chatfb.learning.answers import AnswerBook

    for model in ("chatfb-base", "chatfb-v0001", "chatfb-v0002"):  # their answers to the cycles' fixed questions
        AnswerBook(layout.answers).answers("greedy", model, [q], 128, lambda ps, m=model: [f"{m} says so"] * len(ps))

    assert cli(["delete-user", "ann"]) == 0
    out = capsys.readouterr().out
    assert "until the next cycle retrains): chatfb-v0001" in out and "v0002" not in out
    assert [r["author"] for r in read_rows(layout.work("chatfb-v0001") / "sft.jsonl")] == ["bob"]
    kept = layout.answers.read_text()  # the answers of the adapter trained on her rows are gone, the rest stay
    assert "chatfb-v0001 says so" not in kept and "chatfb-base says so" in kept and "chatfb-v0002 says so" in kept
    with Store(cli_env.db_path) as s:
        assert {a["name"]: a["deleted_users"] for a in s.adapters()} == {"chatfb-v0001": 1, "chatfb-v0002": 0}
    assert cli(["adapters", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "carries 1 deleted user(s)' data" in listing[0] and "carries" not in listing[1]


def test_a_rejection_outlives_its_rows_conversation_and_refuses_the_same_text_again(store, settings):
    """The author deleting the conversation must not undo an admin's rejection: the review record stays, the
    question stays closed to the shared adapter, and the same text sent again (here re-imported, vouched for)
    trains nobody. A decision on the deleted row itself is a clear AdminError."""
    from chatfb.app.admin import AdminError, AdminService
    from chatfb.learning.training_data import trust_decisions

    admin = AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir), settings=settings)
    question, false = "Who painted the Mona Lisa?", "Vincent van Gogh painted the Mona Lisa."
    fid = correct(store, "k:evil", question, false, user="mallory")
    admin.review([fid], "rejected")
    (cid,) = [r[0] for r in store._q("SELECT id FROM conversations WHERE session_id = 'k:evil'")]
    store.delete_conversation(cid)  # the author deletes it in the chat
    assert store.reviews() == {fid: "rejected"} and store.rejected_content() == [(question, false)]

    store.import_feedback([{"prompt": [{"role": "user", "content": question}], "reply": "I am not sure.",
                            "kind": "correction", "text": f"  {false.upper()} ", "user": "mallory2"}], trusted=True)
    store.import_feedback([{"prompt": [{"role": "user", "content": "Who painted the Mona Lisa ?"}], "reply": "Hm.",
                            "kind": "correction", "text": "Leonardo da Vinci.", "user": "ops"}], trusted=True)
    again, other = store.feedback_records()
    d = trust_decisions(store.feedback_records(), settings, store.reviews(), store.flagged_authors(),
                        store.rejected_content())
    assert (d[again.feedback_id].scope, d[again.feedback_id].reason) == ("none", "the same as a row an admin rejected")
    assert (d[other.feedback_id].scope, d[other.feedback_id].reason) == ("personal",
                                                                         "on the question of a row an admin rejected")
    with pytest.raises(AdminError, match=f"no feedback with id {fid}.*nothing was decided"):
        admin.review([fid], "approved")
    assert store.reviews() == {fid: "rejected"}
    store.delete_user("mallory")  # deleting the author keeps the admin's record too (no name in it)
    assert store.reviews() == {fid: "rejected"}
