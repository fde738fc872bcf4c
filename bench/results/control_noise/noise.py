"""How stable are greedy control answers on one vLLM server? The gate's 16 known-answer control questions asked
of the same model ROUNDS times, each round in another batch: alone (one request at a time), all 16 at once, and
the 16 beside 16 other chats (the replay questions, sampled). Per question: how many rounds it was right.

    PYTHONPATH=. python bench/results/control_noise/noise.py http://127.0.0.1:8123 chatfb-base 6 out.json
"""
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor

from chatfb.config import Settings
from chatfb.learning import gate
from chatfb.learning.worker import REPLAY_PROMPTS
from chatfb.serving.model_client import ModelClient

url, model, rounds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = ModelClient(url, timeout_s=600)
control = gate.control_messages(Settings().system_prompt)
accepted = {q: (w, n) for q, w, n in gate.CONTROL_ANSWERS}


def ask(p):
    return client.complete(p, model, max_tokens=gate.CONTROL_MAX_TOKENS, temperature=0.0)[0]


def noise(p):
    return client.complete(p, model, max_tokens=96, temperature=0.8)[0]


results = {}
for way in ("alone", "16 at once", "beside 16 other chats"):
    runs = []
    for r in range(rounds):
        if way == "alone":
            answers = [ask(p) for p in control]
        else:
            others = [[{"role": "user", "content": q}] for q in random.Random(r).sample(REPLAY_PROMPTS, 16)]
            with ThreadPoolExecutor(32) as pool:
                fs = [pool.submit(ask, p) for p in control]
                if way != "16 at once":
                    list(pool.map(noise, others))
                answers = [f.result() for f in fs]
        runs.append([gate.is_right(a, *accepted[q]) for q, a in zip(gate.CONTROL_PROMPTS, answers)])
        print(way, r, sum(runs[-1]), flush=True)
    results[way] = runs
per_q = {q: {way: sum(run[i] for run in runs) for way, runs in results.items()} for i, q in enumerate(gate.CONTROL_PROMPTS)}
json.dump({"rounds": rounds, "model": model, "right_per_round": {w: [sum(r) for r in runs] for w, runs in results.items()},
           "per_question": per_q}, open(out, "w"), indent=1)
flips = {q: v for q, v in per_q.items() if any(0 < n < rounds for n in v.values()) or len(set(v.values())) > 1}
print("right per round:", {w: [sum(r) for r in runs] for w, runs in results.items()})
print(f"questions whose verdict changed between rounds or ways: {len(flips)} of {len(per_q)}")
for q, v in flips.items():
    print(f"  {q}: right in {v} of {rounds} rounds")
