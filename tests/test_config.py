from pathlib import Path

import pytest

from chatfb.config import (REGENERATE, TABLE_BEGIN, TABLE_END, Settings, SettingsError, env_name, load_settings,
                           settings_table, with_settings_table)
from dataclasses import fields


def test_env_and_overrides():
    s = load_settings({"CHATFB_DATA_DIR": "/x", "CHATFB_MAX_TOKENS": "64", "CHATFB_VLLM_URL": "http://gpu:8000/",
                       "CHATFB_SCRUB_PII": "false", "CHATFB_RETENTION_DAYS": "30"}, temperature=0.1)
    assert s.data_dir == Path("/x") and s.max_tokens == 64 and s.temperature == 0.1 and s.retention_days == 30
    assert s.scrub_pii is False and not s.managed and s.base_url == "http://gpu:8000"
    assert load_settings({}).managed and load_settings({}).base_url == "http://127.0.0.1:8011"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="CHATFB_MAX_TOKENS"):
        load_settings({"CHATFB_MAX_TOKENS": "lots"})
    with pytest.raises(ValueError, match="nightly_at"):
        load_settings({"CHATFB_NIGHTLY_AT": "25:99"})
    with pytest.raises(ValueError, match="lora_rank"):
        load_settings({"CHATFB_LORA_RANK": "64"})
    with pytest.raises(ValueError, match="adapter_prefix"):
        load_settings({"CHATFB_ADAPTER_PREFIX": "../x"})
    with pytest.raises(ValueError, match="replay_examples"):
        load_settings({"CHATFB_REPLAY_EXAMPLES": "33"})
    assert load_settings({"CHATFB_ADAPTER_PREFIX": "team_b-2", "CHATFB_TRAIN_DPO": "false"}).train_dpo is False


def test_admin_is_off_without_credentials():
    assert not load_settings({}).admin_enabled
    assert load_settings({"CHATFB_ADMIN_PASSWORD": "pw"}).admin_enabled
    assert load_settings({"CHATFB_ADMIN_HF_USERS": "ann, bob"}).admin_hf_user_list == ("ann", "bob")


def test_settings_doc_carries_exactly_the_generated_table():
    doc = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    assert doc == with_settings_table(doc), (
        f"docs/settings.md's settings table differs from chatfb.config.Settings: run `{REGENERATE}`")
    for f in fields(Settings):
        assert f"`{env_name(f.name)}`" in doc, f"docs/settings.md lacks {env_name(f.name)}"
    assert settings_table().count("\n") == len(fields(Settings)) + 1, "one table row per setting"


def test_settings_table_rewrites_only_between_its_markers():
    stale = f"intro\n{TABLE_BEGIN}\n| stale row |\n{TABLE_END}\noutro\n"
    assert with_settings_table(stale) == f"intro\n{TABLE_BEGIN}\n{settings_table()}\n{TABLE_END}\noutro\n"
    with pytest.raises(SettingsError, match="markers"):
        with_settings_table("no markers here")


@pytest.mark.parametrize("patience", ["0.5", "-1"])
@pytest.mark.parametrize("field", ["revision_patience", "candidate_patience"])
def test_a_patience_below_one_is_refused(field, patience):
    """Below 1 every draft still running when half have finished would be dropped at once."""
    with pytest.raises(SettingsError, match=field):
        load_settings({f"CHATFB_{field.upper()}": patience})
    assert getattr(load_settings({f"CHATFB_{field.upper()}": "0"}), field) == 0
