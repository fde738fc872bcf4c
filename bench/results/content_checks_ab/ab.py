"""The same first-round candidates of the nightly (generate: sampled drafts, cut/framed plain answers, held to
format), scored twice: with chatfb.critique.content as committed (old) and as changed (new). Per task: kept or
not, and whether the kept one follows the family's preference and is right."""
import copy, importlib.util, json, sys
from concurrent.futures import ThreadPoolExecutor
from bench.efficacy_bench import FAMILIES, SYSTEM
from chatfb.critique import candidates, content as new_content
from chatfb.critique.judge import LocalJudge
from chatfb.serving.model_client import ModelClient
from chatfb.config import Settings

spec = importlib.util.spec_from_file_location("content_old", sys.argv[5])  # the committed content.py
old_content = importlib.util.module_from_spec(spec); spec.loader.exec_module(old_content)
url, model_dir, n_prompts, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = ModelClient(url, timeout_s=600)
judge = LocalJudge(model_dir)
s = Settings()

def gen(fam, q):
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    original = client.complete(prompt, "chatfb-base", max_tokens=192, temperature=0.7)[0]
    plain = candidates.plain_answer(client, "chatfb-base", prompt, 192)
    drafts = candidates.generate(client, "chatfb-base", prompt, fam.critique, n=s.critique_samples, max_tokens=192,
                                 plain=[plain, original])
    return dict(family=fam.name, prompt=q, original=original, plain=plain, drafts=drafts, msgs=prompt)

tasks = [(f, q) for f in FAMILIES for q, _ in f.teach[:n_prompts]]
with ThreadPoolExecutor(8) as pool:
    rows = list(pool.map(lambda t: gen(*t), tasks))
fams = {f.name: f for f in FAMILIES}
result = []
for r in rows:
    fam = fams[r["family"]]
    row = dict(family=r["family"], prompt=r["prompt"], original=r["original"], plain=r["plain"])
    for way, mod in (("old", old_content), ("new", new_content)):
        candidates.content = mod
        cands = candidates.score(judge, "chatfb-base", r["msgs"], fam.critique, copy.deepcopy(r["drafts"]),
                                 original=r["original"], reference=r["plain"])
        b = candidates.best(cands)
        row[way] = dict(verdicts=[(c.source, c.verdict, c.text) for c in cands],
                        kept=b.text if b else None,
                        follows=fam.check(b.text) if b else None,
                        right=(fam.right(r["prompt"], b.text) if fam.right else None) if b else None)
    candidates.content = new_content
    result.append(row)
json.dump(result, open(out, "w"), indent=1)
for way in ("old", "new"):
    kept = [r[way] for r in result if r[way]["kept"] is not None]
    both = sum(1 for k in kept if k["follows"] and k["right"] is not False)
    print(f"{way}: tasks {len(result)}, kept {len(kept)}, kept that follow and are right {both}")
changed = [r for r in result if r["old"]["kept"] != r["new"]["kept"]]
print(f"tasks whose kept candidate changed: {len(changed)}")
for r in changed:
    print(f"- {r['family']} | {r['prompt']}\n    old: {r['old']['kept']!r:.160} follows={r['old']['follows']} right={r['old']['right']}"
          f"\n    new: {r['new']['kept']!r:.160} follows={r['new']['follows']} right={r['new']['right']}")
