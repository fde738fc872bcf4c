"""Sentence similarity as the nightly cycle uses it: from several threads at once, on first use."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Eight threads score at once on a fresh interpreter, as refine_all does: each must get the
# embedding model (not the word-overlap fallback) and the same numbers as a single thread.
SCRIPT = r"""
import json, logging, sys
from concurrent.futures import ThreadPoolExecutor
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
from chatfb.critique.similarity import cosines

texts = ["An automobile broke down.", "Bananas are yellow.", "The car would not start."]
with ThreadPoolExecutor(8) as pool:
    together = list(pool.map(lambda i: cosines("My car is broken.", texts), range(8)))
alone = cosines("My car is broken.", texts)
print(json.dumps({"together": together, "alone": alone}))
"""


def test_cosines_from_many_threads_at_first_use_load_the_embedder_once():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "word overlap" not in p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    alone = out["alone"]
    for scores in out["together"]:
        assert [round(x, 5) for x in scores] == [round(x, 5) for x in alone]
    # meaning, not shared words: "automobile" has no word in common with the anchor
    car_synonym, banana, car = alone
    assert car_synonym > banana + 0.2 and car > banana + 0.2


def test_a_text_embedded_lately_is_not_embedded_again_and_the_cache_is_bounded(monkeypatch):
    from chatfb.critique import similarity

    seen: list[str] = []

    def fake(texts):
        seen.extend(texts)
        return [[float(len(t)), 1.0] for t in texts]

    monkeypatch.setattr(similarity, "_embedder", lambda: fake)
    monkeypatch.setattr(similarity, "_vectors", similarity.OrderedDict())
    monkeypatch.setattr(similarity, "VECTOR_CACHE_SIZE", 3)
    assert similarity.embed(["ab", "abc", "ab"]) == [[2.0, 1.0], [3.0, 1.0], [2.0, 1.0]]
    assert seen == ["ab", "abc"]  # each text once, in a call
    assert similarity.embed(["abc", "abcd"]) == [[3.0, 1.0], [4.0, 1.0]] and seen == ["ab", "abc", "abcd"]
    similarity.embed(["x", "y"])  # 5 texts in all: the least recently used ("ab") went
    assert list(similarity._vectors) == ["abcd", "x", "y"]
    assert "ab" not in similarity._vectors
    similarity.embed(["ab"])
    assert seen[-1] == "ab"
