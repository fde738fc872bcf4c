"""The admin operations have one set of rules, whichever front door (CLI, control API, admin tab) calls them."""

import pytest

from chatfb.app.admin import AdminError, AdminService
from chatfb.cli import main as cli
from chatfb.serving.adapters import AdapterRegistry, AdapterRouter
from chatfb.ui.admin_tab import set_guideline


def make_adapter(store, data_dir, name):
    path = data_dir / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    store.add_adapter(name, None, "candidate", name)


def test_guideline_checks_are_the_same_for_the_cli_and_the_admin_tab(store, settings, capsys, monkeypatch):
    admin = AdminService(store, AdapterRegistry.without_servers(store, settings.data_dir), settings=settings)
    too_long = "x" * (settings.max_guideline_chars + 1)
    with pytest.raises(AdminError, match="the limit is"):
        admin.add_guideline(too_long)
    gid = admin.add_guideline("  Always   be brief.  ")
    assert store.guideline(gid)["text"] == "Always be brief."
    with pytest.raises(AdminError, match="the limit is"):
        set_guideline(admin, gid, "edit", too_long)
    personal = store.add_guideline("Call me Ann.", "user", "active", "s1", "ann")
    with pytest.raises(AdminError, match="only guidelines suggested for everyone"):
        set_guideline(admin, personal, "approve")
    with pytest.raises(AdminError, match="no guideline with id"):
        set_guideline(admin, "no-such-id", "retire")
    store.close()
    monkeypatch.setenv("CHATFB_DATA_DIR", str(settings.data_dir))
    assert cli(["guidelines", "add", too_long]) == 2
    assert "the limit is" in capsys.readouterr().err


def test_compare_shows_as_previous_the_version_a_rollback_returns_to(store, settings, fake_client):
    registry = AdapterRegistry(store, [fake_client], AdapterRouter("chatfb-base"), settings.data_dir)
    admin = AdminService(store, registry, settings=settings, client=fake_client)
    for name in ("chatfb-v0001", "chatfb-v0002", "chatfb-v0003"):
        make_adapter(store, settings.data_dir, name)
        registry.activate(name, background_unload=False)
    admin.rollback()  # v0003 rolled back: v0002 serves, and its previous version is v0001, not v0003
    assert registry.previous_version() == "chatfb-v0001"
    fake_client.enqueue("base says", "previous says", "live says")
    assert admin.compare("hello") == ("base says", "previous says", "live says")
    assert [r["model"] for r in fake_client.history] == ["chatfb-base", "chatfb-v0001", "chatfb-v0002"]
