"""Admin password guessing is throttled: per client and overall, with doubling waits, checked on a
fake clock; and through the real `/admin_unlock` endpoint (30 wrong guesses used to take 2.7 s)."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

from gradio_client import Client

from chatfb.ui.admin_tab import WRONG_PASSWORD, unlock_admin
from chatfb.app.runtime import Runtime
from chatfb.ui.throttle import GuessThrottle
from chatfb.ui.chat_tab import build_ui


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_waits_double_after_the_free_guesses_and_stop_at_the_cap():
    clock = FakeClock()
    t = GuessThrottle(free_per_client=3, free_overall=100, base_delay_s=1, max_delay_s=8, clock=clock)
    for _ in range(3):
        assert t.wait_s("1.2.3.4") == 0
        t.failed("1.2.3.4")
    waits = []
    for _ in range(6):
        waits.append(t.wait_s("1.2.3.4"))
        clock.now += waits[-1]
        t.failed("1.2.3.4")
    assert waits == [1, 2, 4, 8, 8, 8]
    assert t.wait_s("5.6.7.8") == 0  # another client is not held up by this one's guesses


def test_a_success_or_a_quiet_hour_forgets_a_clients_failures():
    clock = FakeClock()
    t = GuessThrottle(free_per_client=1, forget_after_s=3600, clock=clock)
    t.failed("a"), t.failed("a")
    assert t.wait_s("a") == 2
    clock.now += 3601
    assert t.wait_s("a") == 0 and t.failed("a") == 1  # counting starts again
    t.failed("a")
    clock.now += 2
    t.succeeded("a")
    assert t.wait_s("a") == 0 and t.failed("a") == 1


def test_guesses_spread_over_many_addresses_slow_everyone_down():
    clock = FakeClock()
    t = GuessThrottle(free_per_client=5, free_overall=10, clock=clock)
    for i in range(12):
        t.failed(f"10.0.0.{i}")  # one guess each: no single client is over its allowance
    assert t.wait_s("10.0.0.1") > 0 and t.wait_s("a newcomer") == t.wait_s("10.0.0.1") == 4


def test_a_flood_of_addresses_keeps_memory_bounded():
    clock = FakeClock()
    t = GuessThrottle(free_overall=10**9, max_clients=100, clock=clock)
    for i in range(1000):
        clock.now += 0.001
        t.failed(f"client {i}")
    assert len(t._failures) <= 102


def test_unlock_does_not_even_check_the_password_while_throttled_and_never_logs_it(settings, caplog):
    clock = FakeClock()
    rt = SimpleNamespace(settings=settings.with_(admin_password="s3cret"))
    t = GuessThrottle(free_per_client=2, clock=clock)
    caplog.set_level(logging.INFO, logger="chatfb.ui.admin_tab")
    assert unlock_admin(rt, t, "guess-1", None, "1.2.3.4") == (False, WRONG_PASSWORD)
    assert unlock_admin(rt, t, "guess-2", None, "1.2.3.4") == (False, WRONG_PASSWORD)
    ok, msg = unlock_admin(rt, t, "s3cret", None, "1.2.3.4")  # the right one, too soon
    assert not ok and msg == "⚠️ Too many wrong passwords. Try again in 2 s."
    assert unlock_admin(rt, t, "s3cret", None, "9.9.9.9") == (True, "Unlocked.")  # another client
    clock.now += 1
    assert unlock_admin(rt, t, "s3cret", None, "1.2.3.4") == (True, "Unlocked.")
    assert "1.2.3.4" in caplog.text and "failed" in caplog.text
    assert "guess-1" not in caplog.text and "s3cret" not in caplog.text


def test_an_allowlisted_login_is_not_throttled(settings):
    clock = FakeClock()
    rt = SimpleNamespace(settings=settings.with_(admin_password="s3cret", admin_hf_users="ann"))
    t = GuessThrottle(free_per_client=0, free_overall=0, clock=clock)
    t.failed("1.2.3.4")
    assert unlock_admin(rt, t, None, SimpleNamespace(username="ann"), "1.2.3.4") == (True, "Unlocked.")
    assert unlock_admin(rt, t, None, SimpleNamespace(username="eve"), "1.2.3.4")[0] is False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_unlock_endpoint_refuses_the_right_password_after_a_run_of_wrong_ones(settings):
    rt = Runtime(settings.with_(vllm_url=f"http://127.0.0.1:{free_port()}", admin_password="s3cret"))
    demo = build_ui(rt)
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for i in range(5):
            assert client.predict(f"guess {i}", api_name="/admin_unlock")[0] == WRONG_PASSWORD
        msg = client.predict("s3cret", api_name="/admin_unlock")[0]
        assert msg.startswith("⚠️ Too many wrong passwords")
        assert client.predict(api_name="/train_now").startswith("⚠️ Unlock")  # still locked
    finally:
        demo.close()
        rt.store.close()
