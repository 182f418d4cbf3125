#!/usr/bin/env python3
"""Prints the criterion results of the last `cargo bench` as Markdown tables of ratios.

    cargo bench --workspace && python3 benches/ratios.py [target/criterion]

Each figure is read against its baseline of the same run: key derivation against
serde_json's parse of the same bytes, each layer path against the bare service, each store
operation against the memory store's get. The time span of the results read is printed
first, so that figures from different runs are not mixed unnoticed.
"""

import json
import os
import sys
import time


def load(root):
    results = {}
    for directory, _, files in os.walk(root):
        if os.path.basename(directory) != "new" or "benchmark.json" not in files:
            continue
        with open(os.path.join(directory, "benchmark.json")) as f:
            bench = json.load(f)
        path = os.path.join(directory, "estimates.json")
        with open(path) as f:
            estimates = json.load(f)
        point = (estimates.get("slope") or estimates["mean"])["point_estimate"]
        results[bench["full_id"]] = {
            "ns": point,
            "bytes": (bench.get("throughput") or {}).get("Bytes"),
            "mtime": os.path.getmtime(path),
        }
    return results


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def key_tables(results):
    # The groups named by a body size ("1 KiB"); others (`key/head/...`) are listed after.
    groups = {k.split("/")[1] for k in results if k.startswith("key/")}
    sizes = sorted(
        (g for g in groups if g.split()[0].replace(".", "", 1).isdigit()),
        key=lambda s: float(s.split()[0]),
    )
    others = sorted(groups - set(sizes))
    if not sizes and not others:
        return
    print("### Key derivation (`benches/key.rs`)\n")
    print("| body | function | time | throughput | × serde_json parse | × blake3::hash |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for size in sizes:
        rows = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"key/{size}/")}
        parse = rows.get("serde_json::from_slice::<Value>")
        blake = rows.get("blake3::hash")
        for name, r in sorted(rows.items(), key=lambda kv: kv[1]["ns"]):
            mib_s = r["bytes"] / (r["ns"] / 1e9) / (1 << 20) if r["bytes"] else 0
            vs_parse = f"{parse['ns'] / r['ns']:.2f}" if parse else ""
            vs_blake = f"{blake['ns'] / r['ns']:.2f}" if blake else ""
            print(f"| {size} | `{name}` | {fmt_time(r['ns'])} | {mib_s:,.0f} MiB/s | {vs_parse} | {vs_blake} |")
    print("\n(× is throughput relative to the column's function on the same bytes, same run.)\n")
    for group in others:
        for name, r in sorted(
            ((k.split("/", 2)[2], v) for k, v in results.items() if k.startswith(f"key/{group}/")),
            key=lambda kv: kv[1]["ns"],
        ):
            print(f"- `key/{group}/{name}`: {fmt_time(r['ns'])}")
    if others:
        print()


def layer_table(results):
    rows = {k[len("layer/"):]: v for k, v in results.items() if k.startswith("layer/")}
    base = rows.get("baseline")
    if not base:
        return
    theirs_name = next(
        (n for n in ("http-cache-tower/POST HIT", "http-cache-tower/GET HIT") if n in rows), None
    )
    theirs = rows.get(theirs_name)
    print("### The layer in process (`benches/layer.rs`): 2 KiB request, 4 KiB answer\n")
    print(f"| path | time | over baseline | × baseline time | × {theirs_name or 'http-cache-tower'} time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    order = sorted(rows.items(), key=lambda kv: (kv[0].split("/")[0] != "baseline", kv[0]))
    for name, r in order:
        over = r["ns"] - base["ns"]
        vs_theirs = f"{r['ns'] / theirs['ns']:.2f}" if theirs and ("HIT" in name or "FALLBACK" in name) else ""
        print(f"| {name} | {fmt_time(r['ns'])} | {'' if name == 'baseline' else ('+' if over >= 0 else '−') + fmt_time(abs(over))} | {r['ns'] / base['ns']:.2f} | {vs_theirs} |")
    print()


def store_table(results):
    rows = {
        k: v
        for k, v in results.items()
        if k.split("/")[0] in ("memory", "disk", "redis") and len(k.split("/")) == 2
    }
    base = rows.get("memory/get 4 KiB")
    if not base:
        return
    print("### Stores (`benches/stores.rs`): a 4 KiB answer\n")
    print("| store / operation | time | × memory get |")
    print("| --- | ---: | ---: |")
    for name, r in sorted(rows.items(), key=lambda kv: ("memory disk redis".split().index(kv[0].split('/')[0]), kv[0])):
        print(f"| {name} | {fmt_time(r['ns'])} | {r['ns'] / base['ns']:.1f} |")
    print()


def other_table(results):
    rest = {
        k: v
        for k, v in results.items()
        if not k.startswith(("key/", "layer/"))
        and not (k.split("/")[0] in ("memory", "disk", "redis") and len(k.split("/")) == 2)
    }
    if not rest:
        return
    print("### Other benches\n")
    print("| bench | time |")
    print("| --- | ---: |")
    for name, r in sorted(rest.items()):
        print(f"| {name} | {fmt_time(r['ns'])} |")
    print()


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "criterion")
    results = load(root)
    if not results:
        sys.exit(f"no criterion results under {root}: run cargo bench first")
    times = [r["mtime"] for r in results.values()]
    span = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    print(f"Results from {span(min(times))} to {span(max(times))}.\n")
    key_tables(results)
    layer_table(results)
    store_table(results)
    other_table(results)


if __name__ == "__main__":
    main()
