"""A/B of the nightly's critique candidates on a real vLLM: the plain answer, the sampled drafts and the held
drafts asked one after another (old, rebuilt here) or side by side (new, chatfb's), the same critiques, arms
in the order old, new, new, old. Like chatfb.learning.worker.select_all: select_rounds (2 rounds), 8 critiques
at once, scored by the local judge. Usage: ab.py [critiques per family] [model dir]. See README.md."""
import sys, time, statistics, os, subprocess, signal
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout this file is in
from bench.efficacy_bench import FAMILIES, messages
from chatfb.critique import candidates
from chatfb.critique.candidates import (Candidate, instruction_messages, collect_drafts, content_keeping, held_to_format)
from chatfb.serving.model_client import ModelClient
from chatfb.critique.judge import LocalJudge
from chatfb.serving.vllm_server import vllm_command, cpu_env
from tests.integration.conftest import free_port, wait_until

new_generate = candidates.generate
def old_generate(client, model, prompt, critique, n=4, max_tokens=256, temperature=0.8, plain=None, patience=0.0):
    messages_ = instruction_messages(prompt, critique)
    choices = collect_drafts(client, messages_, model, n, max_tokens, temperature, patience=patience)
    out = [Candidate(t.strip(), f) for t, f in choices]
    return out + content_keeping(critique, plain) + held_to_format(client, messages_, model, critique, max(1, n // 2), max_tokens, temperature, patience)

model_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "data/models/SmolLM2-135M-Instruct")
port = free_port()
env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", **cpu_env())
proc = subprocess.Popen(vllm_command(model_dir, "chatfb-base", port, 16, 2048), env=env, stdout=open("/tmp/repro/ab-vllm.log","wb"), stderr=subprocess.STDOUT, start_new_session=True)
try:
    client = ModelClient(f"http://127.0.0.1:{port}", timeout_s=300)
    wait_until(lambda: client.healthy() if hasattr(client, "healthy") else False, 300, "vllm", 2)
    judge = LocalJudge(model_dir)
    per = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    tasks = [(messages(q), fam.critique) for fam in FAMILIES for q, _ in fam.teach[:per]]
    print(len(tasks), "tasks;", "with a format regex:", sum(bool(candidates.constraints.format_regex(c)) for _, c in tasks), flush=True)
    def instruct(task):
        prompt, critique = task
        original = originals[id(task)]
        t = time.perf_counter()
        if candidates.generate is old_generate:
            reference = candidates.plain_answer(client, "chatfb-base", prompt, 192)
        else:
            asking = ThreadPoolExecutor(1)
            reference = asking.submit(candidates.plain_answer, client, "chatfb-base", prompt, 192)
        cands = candidates.select_rounds(judge, "chatfb-base", prompt, critique, n=4, max_tokens=192, rounds=2, generator=client,
                                         original=original, reference=reference, patience=0.0)
        return time.perf_counter() - t, candidates.best(cands) is not None
    with ThreadPoolExecutor(8) as pool:  # the critiqued replies, once, the same for both arms
        originals = dict(zip(map(id, tasks), pool.map(lambda t: client.complete(t[0], "chatfb-base", max_tokens=128, temperature=0.8)[0], tasks)))
    res = {}
    for arm in ("old", "new", "new", "old"):
        candidates.generate = old_generate if arm == "old" else new_generate
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(instruct, tasks))
        wall = time.perf_counter() - t0
        res.setdefault(arm, []).append(wall)
        print(arm, f"wall {wall:.1f}s, per-task select median {statistics.median(o[0] for o in out):.1f}s, kept {sum(o[1] for o in out)}/{len(out)}", flush=True)
    print({k: [round(v, 1) for v in vs] for k, vs in res.items()}, "new/old", round(sum(res['new'])/sum(res['old']), 3))
finally:
    os.killpg(proc.pid, signal.SIGTERM)
