#!/usr/bin/env python3
"""Markdown table from a pytest-benchmark JSON file: each vtk case beside its published twin.

usage: python tools/bench_table.py benchmarks/results/FILE.json
"""
import json
import re
import sys


def main(path):
    data = json.load(open(path))
    env = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    rows = {}
    for b in data["benchmarks"]:
        name = b["name"]
        impl = "vtk" if "-vtk" in name else ("published" if "-published" in name else None)
        if impl is None:
            continue
        key = re.sub(r"-(vtk|published)", "", name)
        rows.setdefault(key, {})[impl] = (b["stats"]["median"], b["extra_info"].get("peak_bytes", -1))
    dev = env.get("gpu") or f"CPU ({env.get('machine', '?')}, {env.get('threads', '?')} threads)"
    print(f"Device: {dev}; torch {env.get('torch', '?')}; median times.\n")
    print("| case | vtk | published | speed-up | peak memory vtk / published |")
    print("|---|---|---|---|---|")

    def ms(t):
        return f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.2f} s"

    def mib(n):
        return "?" if n < 0 else f"{n / 2**20:.2f} MiB"

    for key in sorted(rows):
        r = rows[key]
        v, p = r.get("vtk"), r.get("published")
        cells = [key, ms(v[0]) if v else "", ms(p[0]) if p else "",
                 f"{p[0] / v[0]:.1f}x" if v and p else "",
                 f"{mib(v[1]) if v else ''} / {mib(p[1]) if p else ''}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
