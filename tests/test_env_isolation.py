"""The autouse fixture in conftest.py: no developer CHATFB_* setting reaches a test."""

import os

from chatfb.config import load_settings


def test_settings_see_only_the_test_environment(tmp_path):
    assert not [k for k in os.environ if k.startswith("CHATFB_") and k not in ("CHATFB_DATA_DIR",)
                and not k.startswith("CHATFB_TEST_")]
    s = load_settings()
    assert s.data_dir == tmp_path / "data"
    assert s == load_settings({}, data_dir=tmp_path / "data")  # every other field at its default
