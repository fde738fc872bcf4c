"""The same candidates (bench/results/content_checks_ab/ab.json), scored with and without the frame check."""
import json, sys
from bench.efficacy_bench import FAMILIES, SYSTEM
from chatfb.critique import candidates
from chatfb.critique.judge import LocalJudge
rows = json.load(open(sys.argv[1])); judge = LocalJudge(sys.argv[2]); fams = {f.name: f for f in FAMILIES}
real = candidates.only_the_frame
res = {"without": [0, 0, 0], "with": [0, 0, 0]}
changed = []
for r in rows:
    fam = fams[r["family"]]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}]
    kept = {}
    for way in ("without", "with"):
        candidates.only_the_frame = real if way == "with" else (lambda *a: False)
        cands = [candidates.Candidate(t, "length" if v.startswith("cut off") else None, source=s) for s, v, t in r["new"]["verdicts"]]
        b = candidates.best(candidates.score(judge, "chatfb-base", msgs, fam.critique, cands, original=r["original"], reference=r["plain"]))
        res[way][0] += 1
        if b:
            res[way][1] += 1
            res[way][2] += bool(fam.check(b.text) and (fam.right(r["prompt"], b.text) if fam.right else True))
        kept[way] = b.text if b else None
    if kept["with"] != kept["without"]:
        changed.append((r["family"], r["prompt"], kept["without"], kept["with"]))
for way, (t, k, both) in res.items():
    print(f"{way} the frame check: tasks {t}, a candidate kept {k}, kept that follow and are right {both}")
for f, q, a, b in changed:
    print(f"- {f} | {q}\n    without: {a!r:.150}\n    with:    {b!r:.150}")
