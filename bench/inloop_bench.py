"""In-loop feedback benchmark: how fast a critique gets its proposed revision, how often one is
offered and follows the critique, and what a saved guideline does to a user's next replies.

Driven through chatfb's own ChatService (the app's code path: store, router, vLLM streaming with n
candidates, the local judge) against one vLLM server, one user at a time as a person would:

- Revision: for each family's teach prompts (bench.efficacy_bench FAMILIES), the user asks, then
  critiques the reply with the family's critique. Measured: seconds from sending the critique to the
  revision's first streamed token, and to the offered revision (candidates scored); whether one was
  offered; whether the offered one passes the family's checker (what a user would accept).
- Guideline: a user saves the family's critique as a guideline, then asks the family's held-out
  prompts; a second user without it asks the same. Measured: share of replies passing the checker.

    python -m bench.inloop_bench --vllm-url http://127.0.0.1:8011 --model-dir data/models/SmolLM2-135M-Instruct
    python -m bench.inloop_bench --smoke ...      # 1 family, 1 prompt, 1 held-out prompt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from bench.efficacy_bench import FAMILIES, SYSTEM
from bench.report import add_output_flags, default_out_dir, machine, markdown_table, percentile, write_results
from bench.server import SERVED_NAME, add_server_flags, vllm_server

NAME = "inloop_bench"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.inloop_bench", description=__doc__.split("\n")[0])
    add_server_flags(p)
    p.add_argument("--families", nargs="+", choices=[f.name for f in FAMILIES], default=None,
                   help="which families (default: all)")
    p.add_argument("--prompts", type=int, default=4, help="critiqued prompts per family")
    p.add_argument("--heldout", type=int, default=5, help="replies after saving a guideline, per family")
    p.add_argument("--max-tokens", type=int, default=128, help="chat reply max tokens")
    p.add_argument("--patience", type=float, nargs="+", default=None,
                   help="CHATFB_REVISION_PATIENCE values to compare side by side: each critiqued prompt is asked and "
                        "critiqued once per value, in turn (default: the setting's default alone)")
    add_output_flags(p, smoke_help="tiny run: 1 family, 1 critiqued prompt, 1 held-out prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    families = [f for f in FAMILIES if args.families is None or f.name in args.families]
    if args.smoke:
        families, args.prompts, args.heldout = families[:1], 1, 1
    from chatfb.serving.adapters import AdapterRouter
    from chatfb.app.chat_service import ChatService
    from chatfb.config import load_settings
    from chatfb.critique.judge import LocalJudge
    from chatfb.serving.model_client import ModelClient
    from chatfb.store.db import Store

    results: dict = {"bench": NAME, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                     "families": {}}
    work = Path(tempfile.mkdtemp(prefix="chatfb-inloop-"))
    with vllm_server(args) as server, Store(work / "chatfb.duckdb") as store:
        settings = load_settings({}, data_dir=work, served_model_name=SERVED_NAME, max_tokens=args.max_tokens,
                                 rate_limit_per_minute=100000, system_prompt=SYSTEM)
        client = ModelClient(server.url, args.api_key, timeout_s=300)
        judge = LocalJudge(server.model_dir)
        router = AdapterRouter(SERVED_NAME)
        patiences = args.patience or [settings.revision_patience]
        # the ways compared side by side: (label, patience, the chat service)
        variants = [(f"patience {p:g}", p, ChatService(dataclasses.replace(settings, revision_patience=p), store,
                                                         client, router, judge)) for p in patiences]
        chat = variants[0][2]
        chat.judge.completion_logprobs([{"role": "user", "content": "hi"}], "hello")  # load it before timing
        for fam in families:
            rows = []
            # each prompt once per variant, their order alternating from one prompt to the next
            for i, (prompt, _), (label, patience, chat) in ((i, t, v) for i, t in enumerate(fam.teach[:args.prompts])
                                                            for v in (variants if i % 2 == 0 else variants[::-1])):
                session = f"{fam.name}-r{i}-{label}"
                cid, stream = chat.send(session, None, prompt, SYSTEM)
                mid = list(stream)[-1].message_id
                t0 = time.perf_counter()
                first = None
                _, revision = chat.revise(session, mid, fam.critique)
                for upd in revision:
                    if first is None and upd.text:
                        first = time.perf_counter() - t0
                    final = upd
                offered = final.candidate_id is not None
                right = offered and fam.right(prompt, final.text) if fam.right else None  # None: no known answer
                rows.append({"prompt": prompt, "variant": label, "patience": patience, "ttft_s": first, "offered_s": time.perf_counter() - t0,
                             "offered": offered, "passes": offered and fam.check(final.text), "right": right,
                             "both": None if right is None else bool(right and fam.check(final.text)),
                             "revision": final.text[:300], "error": final.error})
            chat = variants[0][2]
            guided, plain = f"{fam.name}-g", f"{fam.name}-p"
            chat.save_guideline(guided, fam.critique)
            follow = {"with": [], "without": [], "with_right": [], "without_right": []}
            for q in fam.heldout[:args.heldout]:
                for who, key in ((guided, "with"), (plain, "without")):
                    _, stream = chat.send(who, None, q, SYSTEM)
                    text = list(stream)[-1].text
                    follow[key].append(fam.check(text))
                    if fam.right:  # the known answer kept, whatever the format
                        follow[f"{key}_right"].append(fam.right(q, text))
            results["families"][fam.name] = {"revisions": rows, "guideline": follow}
            print(f"[{fam.name}] offered {sum(r['offered'] for r in rows)}/{len(rows)}, passing "
                  f"{sum(r['passes'] for r in rows)}; guideline {sum(follow['with'])}/{len(follow['with'])} vs "
                  f"{sum(follow['without'])}/{len(follow['without'])}", flush=True)
        client.close()
    md = report(results)
    print(md)
    write_results(args.out_dir or default_out_dir(args.smoke), NAME, results, md)
    return 0


def patience_report(results: dict) -> list[str]:
    """One line per way compared (--patience): the offered revision's time and what passed."""
    revs = [x for r in results["families"].values() for x in r["revisions"]]
    def way(x: dict) -> str:
        return x.get("variant") or ("default" if x.get("patience") is None else f"patience {x['patience']:g}")
    values = list(dict.fromkeys(map(way, revs)))
    if len(values) < 2:
        return []
    lines = ["| way | critiques | offered | median s to the offer (offered) | median s to the end (all) | "
             "offered: passes and right |", "|---|---|---|---|---|---|"]
    for p in values:
        mine = [x for x in revs if way(x) == p]
        offered = [x for x in mine if x["offered"]]
        known = [x for x in mine if x.get("both") is not None]
        lines.append(f"| {p} | {len(mine)} | {len(offered)} | {percentile([x['offered_s'] for x in offered], 50):.2f} | "
                     f"{percentile([x['offered_s'] for x in mine], 50):.2f} | "
                     f"{sum(x['both'] for x in known)}/{len(known)} |")
    return ["Side by side (each critiqued prompt asked and critiqued once each way, the order alternating from "
            "one prompt to the next; patience 0 waits for every draft):", "", *lines, ""]


def report(results: dict) -> str:
    rows, ttft, offered_s = [], [], []
    # ways compared side by side (--patience): the headline and the table are the first way's; the side-by-side
    # table has them all
    first = next((x.get("variant") for r in results["families"].values() for x in r["revisions"]), None)
    for name, r in results["families"].items():
        revs, g = [x for x in r["revisions"] if x.get("variant") == first], r["guideline"]
        ttft += [x["ttft_s"] for x in revs if x["ttft_s"] is not None]
        offered_s += [x["offered_s"] for x in revs if x["offered"]]
        known = [x for x in revs if x.get("both") is not None]
        both = f"{sum(x['both'] for x in known)}/{len(known)}" if known else "n/a"

        def with_right(key: str) -> str:  # follows the preference and keeps the known answer
            right = g.get(f"{key}_right") or []
            return f"{sum(f and r for f, r in zip(g[key], right))}/{len(right)}" if right else "n/a"
        rows.append([name, f"{sum(x['offered'] for x in revs)}/{len(revs)}", f"{sum(x['passes'] for x in revs)}/{len(revs)}",
                     both, f"{sum(g['with'])}/{len(g['with'])}", with_right("with"),
                     f"{sum(g['without'])}/{len(g['without'])}", with_right("without")])
    m = results["machine"]
    return "\n".join([
        "# In-loop feedback", "",
        f"Critique -> first token of the proposed revision: median {percentile(ttft, 50):.2f} s, p90 "
        f"{percentile(ttft, 90):.2f} s (n={len(ttft)}); -> revision offered (all candidates generated and scored): "
        f"median {percentile(offered_s, 50):.2f} s, p90 {percentile(offered_s, 90):.2f} s.", "",
        markdown_table(["family", "revision offered", "offered revision passes the checker", "offered: passes and right",
                        "next replies pass, with the guideline", "pass and right", "without", "pass and right, without"],
                       rows), "", *patience_report(results),
        "One user at a time; each revision is n candidates in one vLLM request, scored by the local judge. "
        "\"Passes the checker\": the family's automatic check (bench.efficacy_bench), what a user checking the "
        "proposed fix would accept. \"Right\": the reply still gives the prompt's known answer (the family's "
        "known-answer check; n/a where the family has none).", "",
        f"Machine: {m['host_cpus']} CPUs, load {m['load_avg_1m_at_start']} at start, {m['time_utc']}."])


if __name__ == "__main__":
    sys.exit(main())
