#!/usr/bin/env python3
"""README's benchmark tables, the GPU targets and a speed-up plot, from run summaries.

A summary is one run's compact JSON (benchmarks/results/*.json, written by
`pytest benchmarks --benchmark --vtk-summary FILE`; format in benchmarks/bench_util.py): per case
its median / p20 / p80 time, peak memory and what it measured, with the device, versions and commit.

usage:
  tools/bench_table.py SUMMARY.json...                 markdown: op table and end-to-end table
  tools/bench_table.py --targets SUMMARY.json...       the issue's GPU targets: measured, pass/fail
  tools/bench_table.py --png FILE SUMMARY.json...      speed-up of vtk over published, per op and batch
  tools/bench_table.py --convert RAW.json OUT.json [--command CMD]
                                                       a pytest-benchmark JSON dump -> a summary
Several summaries may be given (e.g. the op run and the end-to-end run of one GPU lane): their
cases are read together, and the environment is taken from the first.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_util import SUMMARY_FORMAT, case_summary, write_summary  # noqa: E402

# Environment keys the old dumps repeated in every case's extra_info.
ENV_KEYS = ("torch", "python", "machine", "threads", "gpu", "cuda", "triton", "transformers", "sm_count",
            "gpu_memory_gib")


def load(paths):
    """(environment of the first summary, every case of all of them)."""
    env, cases = None, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != SUMMARY_FORMAT:
            sys.exit(f"{path}: not a {SUMMARY_FORMAT} file (tools/bench_table.py --convert turns a "
                     f"pytest-benchmark dump into one)")
        env = env or dict(data["environment"], commit=data.get("commit", "?"))
        cases += data["cases"]
    return env or {}, cases


def ms(t):
    return "" if t is None else (f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.2f} s")


def mib(n):
    return "" if n is None else ("?" if n < 0 else f"{n / 2**20:.2f} MiB")


def pair_key(name):
    """The case's name without its implementation: vtk and published twins share it."""
    return re.sub(r"-(vtk|published)", "", name)


def op_table(env, cases):
    rows = {}
    for c in cases:
        if c.get("impl") in ("vtk", "published"):
            rows.setdefault(pair_key(c["case"]), {})[c["impl"]] = c
    if not rows:
        return []
    out = [f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; commit {env.get('commit', '?')}; "
           "median times.", "", "| case | vtk | published | speed-up | peak memory vtk / published |",
           "|---|---|---|---|---|"]
    for key in sorted(rows):
        v, p = rows[key].get("vtk"), rows[key].get("published")
        cells = [key, ms(v and v["median_s"]), ms(p and p["median_s"]),
                 f"{p['median_s'] / v['median_s']:.1f}x" if v and p else "",
                 f"{mib(v and v.get('peak_bytes'))} / {mib(p and p.get('peak_bytes'))}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def e2e_table(cases):
    pre = [c for c in cases if c.get("method")]
    if not pre:
        return []
    label = lambda c: c["method"] + (f"-{c['keep']}" if c.get("keep") else "")  # noqa: E731
    batches = sorted({c["B"] for c in pre})
    by = {(label(c), c["B"]): c for c in pre}
    methods = list(dict.fromkeys(label(c) for c in sorted(pre, key=lambda c: _method_order(c))))
    head = ["method"] + [x for b in batches for x in (f"B={b} prefill", "vs unpruned")] + [f"peak memory B={batches[-1]}"]
    out = [f"Model: {pre[0].get('model', '?')}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        for b in batches:
            c, base = by.get((m, b)), by.get(("unpruned", b))
            cells += [ms(c and c["median_s"]), f"{base['median_s'] / c['median_s']:.2f}x" if c and base else ""]
        last = by.get((m, batches[-1]))
        cells.append(mib(last and last.get("peak_bytes")))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _method_order(c):
    order = ["unpruned", "fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus"]
    return (order.index(c["method"]) if c["method"] in order else len(order), c.get("keep") or 0)


# --- the GPU targets (issue 7) ---------------------------------------------------------------------

def _find(cases, **want):
    for c in cases:
        if all(c.get(k) == v for k, v in want.items()):
            return c
    return None


def targets(cases):
    """[(target, measured, verdict)]: verdict 'pass', 'FAIL' or 'not measured'."""
    rows = []
    copy = _find(cases, op="copy")
    bw = copy["bytes_moved"] / copy["median_s"] if copy else None
    rows.append(("device-to-device copy bandwidth (the DRAM floor's denominator)",
                 f"{bw / 1e9:.0f} GB/s" if bw else "", "measured" if bw else "not measured"))
    for op in ("cls_attention", "topk_indices", "gather_tokens", "fopru_select"):
        c = _find(cases, op=op, impl="vtk", model="llava15", B=64)
        name = f"`{op}` at B = 64 within 2x of the DRAM floor (bytes moved / copy bandwidth)"
        if c and bw and c.get("bytes_moved"):
            ratio = c["median_s"] / (c["bytes_moved"] / bw)
            rows.append((name, f"{ratio:.2f}x the floor ({ms(c['median_s'])}, {c['bytes_moved'] / 2**20:.1f} MiB)",
                         "pass" if ratio <= 2 else "FAIL"))
        else:
            rows.append((name, "", "not measured"))

    def speedup(name, goal, op, B, **kw):
        v = _find(cases, op=op, impl="vtk", model="llava15", B=B, **kw)
        p = _find(cases, op=op, impl="published", model="llava15", B=B, **kw)
        if v and p:
            s = p["median_s"] / v["median_s"]
            rows.append((name, f"{s:.1f}x ({ms(v['median_s'])} vs {ms(p['median_s'])})", "pass" if s >= goal else "FAIL"))
        else:
            rows.append((name, "", "not measured"))

    speedup("`fopru_significance` >= 3x faster than the full-attention path at B = 8", 3, "fopru_significance", 8)
    speedup("`vispruner_select` >= 20x faster than the published structure at B = 1", 20, "vispruner_select", 1)
    speedup("`prumerge` >= 50x faster than the published structure at B = 1", 50, "prumerge", 1)
    for op in ("vispruner_select", "prumerge"):
        c = _find(cases, op=op, impl="vtk", model="llava15", B=64)
        name = f"`{op}` < 100 us per image at B = 64"
        if c:
            per = c["median_s"] / 64
            rows.append((name, f"{per * 1e6:.1f} us per image", "pass" if per < 100e-6 else "FAIL"))
        else:
            rows.append((name, "", "not measured"))
    base = _find(cases, method="unpruned", B=1)
    vis = _find(cases, method="vispruner", keep=64, B=1)
    name = "LLaVA-1.5-7B-shaped prefill, VisPruner at 64 tokens >= 3.5x faster than unpruned at B = 1"
    if base and vis:
        s = base["median_s"] / vis["median_s"]
        rows.append((name, f"{s:.2f}x ({ms(vis['median_s'])} vs {ms(base['median_s'])}; {vis.get('model', '?')})",
                     "pass" if s >= 3.5 else "FAIL"))
    else:
        rows.append((name, "", "not measured"))
    # VisPruner's pruning work in that prefill: its CLS scores and its selection (op cases, B = 1).
    cls = _find(cases, op="cls_attention", impl="vtk", model="llava15", B=1)
    sel = _find(cases, op="vispruner_select", impl="vtk", model="llava15", B=1)
    name = "pruning (cls_attention + vispruner_select at B = 1) < 3% of that pruned prefill"
    if vis and cls and sel:
        share = (cls["median_s"] + sel["median_s"]) / vis["median_s"]
        rows.append((name, f"{share * 100:.2f}% ({ms(cls['median_s'] + sel['median_s'])})",
                     "pass" if share < 0.03 else "FAIL"))
    else:
        rows.append((name, "", "not measured"))
    rows += glimpse_targets(cases, bw)
    return rows


def glimpse_targets(cases, bw):
    """Issue 9 (GlimpsePrune): gather_cache within 2x of the DRAM floor (7B cache, 32 KV heads, 70
    kept); the glimpse's own cost (VIP + row + gather) under 3% of the pruned prefill of
    LLaVA-1.5-7B, from the part-by-part cases of test_glimpse_overhead (each x its count)."""
    rows = []
    c = _find(cases, op="gather_cache", impl="vtk", kv_heads=32, M=70)
    name = "`gather_cache` (7B cache, 44 tensors, 70 kept) within 2x of the DRAM floor"
    if c and bw and c.get("bytes_moved"):
        ratio = c["median_s"] / (c["bytes_moved"] / bw)
        rows.append((name, f"{ratio:.2f}x the floor ({ms(c['median_s'])}, {c['bytes_moved'] / 2**20:.1f} MiB)",
                     "pass" if ratio <= 2 else "FAIL"))
    else:
        rows.append((name, "", "not measured"))
    parts = {p: _find(cases, op="glimpse_overhead", part=p, model="llava15-7b")
             for p in ("layer_full", "layer_pruned", "vip", "row", "gather")}
    name = "the glimpse's own cost (VIP + row + gather) < 3% of the pruned LLaVA-1.5-7B prefill (language model)"
    if all(parts.values()):
        own = sum(parts[p]["median_s"] for p in ("vip", "row", "gather"))
        llm = sum(parts[p]["median_s"] * parts[p]["count"] for p in ("layer_full", "layer_pruned"))
        share = own / (own + llm)
        rows.append((name, f"{share * 100:.2f}% ({ms(own)} of {ms(own + llm)})", "pass" if share < 0.03 else "FAIL"))
    else:
        rows.append((name, "", "not measured"))
    return rows


def targets_table(env, cases):
    out = [f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
           f"Triton {env.get('triton', '-')}; commit {env.get('commit', '?')}.", "",
           "| target | measured | result |", "|---|---|---|"]
    out += [f"| {t} | {m} | {v} |" for t, m, v in targets(cases)]
    return out


# --- plot --------------------------------------------------------------------------------------------

def plot(env, cases, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--png needs matplotlib (make venv installs it)")
    pairs = {}
    for c in cases:
        if c.get("impl") in ("vtk", "published"):
            pairs.setdefault((c["op"], c.get("model"), c["B"]), {})[c["impl"]] = c["median_s"]
    speed = {k: v["published"] / v["vtk"] for k, v in pairs.items() if "vtk" in v and "published" in v}
    if not speed:
        sys.exit("no case has both a vtk and a published time")
    labels = sorted({(op, model) for op, model, _ in speed})
    batches = sorted({b for _, _, b in speed})
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(labels) * max(1, len(batches)) ** 0.5 + 2), 4.8))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(labels))]
        ys = [speed.get((op, model, b), 0) for op, model in labels]
        ax.bar(xs, ys, width, label=f"B = {b}")
        for x, y in zip(xs, ys):
            if y:
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{op} ({model})" if model else op for op, model in labels], fontsize=8, rotation=30,
                       ha="right")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speed-up over the published path (median)")
    ax.set_title(f"vtkernels on {env.get('device', '?')}, torch {env.get('torch', '?')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --- conversion of the old raw dumps --------------------------------------------------------------

def convert(raw_path, out_path, command):
    with open(raw_path) as f:
        raw = json.load(f)
    benches = raw["benchmarks"]
    first = benches[0]["extra_info"] if benches else {}
    env = {k: first[k] for k in ENV_KEYS if k in first}
    env["device"] = first.get("gpu") or f"CPU ({first.get('machine', '?')}, {first.get('threads', '?')} threads)"
    commit = raw.get("commit_info", {})
    cases = []
    for b in benches:
        if "data" not in b["stats"]:
            sys.exit(f"{raw_path}: {b['name']} has no per-round data (needs --benchmark-save-data)")
        info = {k: v for k, v in b["extra_info"].items() if k not in ENV_KEYS}
        cases.append(case_summary(b["name"], b["stats"]["data"], info))
    write_summary(out_path, cases, env, (commit.get("id", "?")[:12] + ("+dirty" if commit.get("dirty") else "")),
                  command or "(converted from a pytest-benchmark dump)", created=raw.get("datetime"))
    print(f"wrote {out_path}: {len(cases)} cases")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--targets", action="store_true", help="the GPU targets table")
    ap.add_argument("--png", metavar="FILE", help="draw the speed-up per op and batch size")
    ap.add_argument("--convert", action="store_true", help="files = RAW.json OUT.json")
    ap.add_argument("--command", help="with --convert: the command that produced the dump")
    args = ap.parse_args(argv)
    if args.convert:
        if len(args.files) != 2:
            ap.error("--convert takes RAW.json OUT.json")
        convert(args.files[0], args.files[1], args.command)
        return
    env, cases = load(args.files)
    if args.png:
        plot(env, cases, args.png)
        return
    lines = targets_table(env, cases) if args.targets else op_table(env, cases) + [""] + e2e_table(cases)
    print("\n".join(lines).strip())


if __name__ == "__main__":
    main()
