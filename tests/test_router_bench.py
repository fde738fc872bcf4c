"""The router benchmark's smoke mode against two fake replicas (tests/fake_openai.py) behind a real
vllm-router: the table has both paths side by side and no request failed."""

import json
import sys

from bench import router_bench
from chatfb.serving.managed_replicas import ManagedReplicas
from tests.serving.test_vllm_server import FAKE, free_port


def fake_pool(model_dir, data_dir):
    pool = ManagedReplicas(model_dir, "chatfb-base", free_port(), data_dir, 2, data_dir / "shared", startup_timeout_s=20)
    for r in pool.replicas:
        r.cmd = [sys.executable, str(FAKE), str(r.port), "3", "0", str(model_dir)]
    pool.start()
    return pool


def test_router_bench_smoke_measures_both_paths_side_by_side(tmp_path):
    results = router_bench.main(["--smoke", "--out-dir", str(tmp_path), "--model-dir", str(tmp_path / "model")],
                                pool_factory=fake_pool)
    saved = json.loads((tmp_path / "router_bench.json").read_text())
    assert [lv["chats"] for lv in saved["levels"]] == [1, 2] == [lv["chats"] for lv in results["levels"]]
    for lv in saved["levels"]:
        for path in ("router, 2 replicas", "1 replica direct"):
            assert lv[path]["failures"] == 0 and lv[path]["requests"] == lv["chats"] * 2
            assert lv[path]["tokens"] == 3 * lv["chats"] * 2  # the fake's 3 words per reply, all counted
    markdown = (tmp_path / "router_bench.md").read_text()
    assert "| chats | router tok/s | direct tok/s | router / direct |" in markdown
    assert markdown.count("\n| 2 | ") == 1 and "0 / 0" in markdown
    assert saved["targets"][0]["ok"] is True and "| failed requests through the router | 0.00 | == 0 | met |" in markdown
