"""`python -m chatfb api-key create|list|revoke USER`, with the app running (through its control API)
and without it: a created key lets its user in, only its hash is stored, a revoked key does not."""

import pytest

from chatfb.app.api_keys import key_hash, user_for_key
from chatfb.app.admin import AdminService
from chatfb.app.control import ControlServer
from chatfb.cli import main as cli
from chatfb.serving.adapters import AdapterRegistry
from chatfb.store.db import Store


def created_key(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_api_keys_through_the_running_app(store, settings, capsys):
    server = ControlServer(AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir)), settings.data_dir)
    server.start()
    try:
        assert cli(["api-key", "create", "ann"]) == 0
        key = created_key(capsys)
        assert key.startswith("cfb_") and user_for_key(store, key) == "ann"
        assert key not in str(store._q("SELECT * FROM api_keys")) and store.api_key_user(key_hash(key)) == "ann"
        assert cli(["api-key", "list"]) == 0
        listed = capsys.readouterr().out
        assert "ann" in listed and key[:10] in listed and key not in listed and "live" in listed
        assert cli(["api-key", "revoke", "ann"]) == 0
        assert "revoked 1 key of 'ann'" in capsys.readouterr().out
        assert user_for_key(store, key) is None
        assert cli(["api-key", "create", " "]) == 2
        assert "needs a USER" in capsys.readouterr().err
    finally:
        server.stop()


def test_api_keys_without_the_app(settings, capsys):
    assert cli(["api-key", "create", "bob"]) == 0
    key = created_key(capsys)
    assert cli(["api-key", "create", "bob"]) == 0
    with Store(settings.db_path) as s:
        first, second = s.api_keys("bob")
    assert cli(["api-key", "revoke", "bob", "--id", first["id"]]) == 0
    with Store(settings.db_path) as s:
        assert user_for_key(s, key) is None and [k["revoked_at"] is None for k in s.api_keys("bob")] == [False, True]


@pytest.mark.parametrize("key", [None, "", "cfb_", "Bearer cfb_x", "x" * 300])
def test_no_user_for_a_malformed_key(store, key):
    assert user_for_key(store, key) is None
