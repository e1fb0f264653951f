"""Simnet reports: report.json, four PNG plots and a text summary table.

report.json = {"scenario": the scenario as run, "summary": headline figures,
"metrics": everything measured (per provide, per lookup, ...), "run": wall
seconds and peak RSS}. "summary" and "metrics" depend only on the scenario
and its seed; "run" is the machine's cost of producing them.

Messages are requests (one stream each; simnet/runner.py counts them). A
lookup's or provide's count includes the pings its replies trigger (routing
table upkeep caused by that operation); "reprovide messages per key" is what
one node providing [workload] reprovide_keys keys at once costs per key
(DhtService.provide_many: the keyspace sweep of the 22-hourly republish, a
few FIND_NODE walks + about one AddProviders per peer); "reprovide held by"
is, for sampled keys, how many of their k closest honest nodes got the record.

Latencies are simulated (trio virtual) seconds. Quantiles use the nearest-rank
method, so every reported value is one that was measured.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

PLOTS = ("lookup_hops.png", "lookup_latency_cdf.png", "success_over_time.png",
         "reprovide_messages_per_key.png")


def quantile(values, q: float):
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summarize(metrics: dict) -> dict:
    lookups = metrics["lookups"]
    counted = [r for r in lookups if not r["requester_left"]]
    ok = [r for r in counted if r["ok"]]
    hops = [r["hops"] for r in counted]
    lat = [r["latency"] for r in counted]
    plat = [r["latency"] for r in metrics["provides"]]
    rep = metrics.get("reprovide") or {}
    held = rep.get("sample_held_by_k_closest") or []
    return {
        "nodes": metrics["nodes"],
        "lookups": len(lookups),
        "lookups_requester_left": len(lookups) - len(counted),
        "lookups_owner_left": sum(1 for r in counted if r.get("owner_left")),
        "success_rate": len(ok) / len(counted) if counted else None,
        "hops_median": statistics.median(hops) if hops else None,
        "hops_p90": quantile(hops, 0.9),
        "find_latency_p50": quantile(lat, 0.5),
        "find_latency_p95": quantile(lat, 0.95),
        "provides": len(plat),
        "provide_latency_median": statistics.median(plat) if plat else None,
        "provide_stored_median": (statistics.median(r["stored"] for r in metrics["provides"])
                                  if plat else None),
        "messages_per_lookup": (statistics.mean(r["requests"] for r in counted)
                                if counted else None),
        "messages_per_provide": (statistics.mean(r["requests"] for r in metrics["provides"])
                                 if plat else None),
        "reprovide_keys": rep.get("keys"),
        "reprovide_messages_per_key": rep.get("requests_per_key"),
        "reprovide_held_median": statistics.median(held) if held else None,
        "reprovide_held_min": min(held) if held else None,
        "join_seconds": metrics["join"]["seconds"],
        "join_messages_per_node": metrics["join"]["requests_per_node"],
        "background_messages_per_node_hour": metrics["background_requests_per_node_hour"],
        "churn_replacements": metrics["churn_replacements"],
        "flood_keys_sent": (metrics.get("flood") or {}).get("keys", 0),
        "flood_refused_by_honest": (metrics.get("flood") or {}).get("refused_by_honest", 0),
        "flood_honest_stores_full": (metrics.get("flood") or {}).get("honest_stores_full", 0),
        "handler_errors": metrics["handler_errors"] + metrics["service_handler_errors"],
    }


def build(scenario_json: dict, metrics: dict, wall_seconds: float, peak_rss_bytes: int) -> dict:
    return {"scenario": scenario_json, "summary": summarize(metrics), "metrics": metrics,
            "run": {"wall_seconds": wall_seconds, "peak_rss_bytes": peak_rss_bytes}}


def _fmt(v, unit: str = "", digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    return f"{v}{unit}"


def table(report: dict) -> str:
    s, r, sc = report["summary"], report["run"], report["scenario"]
    rows = [
        ("scenario", f"{sc['name']} (seed {sc['seed']})"),
        ("nodes", _fmt(s["nodes"])),
        ("lookups", f"{s['lookups']} (requester left during it: "
                    f"{s['lookups_requester_left']}; provider gone: {s['lookups_owner_left']})"),
        ("find-providers success", _fmt(None if s["success_rate"] is None
                                        else 100 * s["success_rate"], " %", 4)),
        ("hops median / p90", f"{_fmt(s['hops_median'])} / {_fmt(s['hops_p90'])}"),
        ("find latency p50 / p95", f"{_fmt(s['find_latency_p50'], ' s')} / "
                                   f"{_fmt(s['find_latency_p95'], ' s')}  (simulated)"),
        ("provide latency median", f"{_fmt(s['provide_latency_median'], ' s')}  (simulated), "
                                   f"stored on {_fmt(s['provide_stored_median'])} peers"),
        ("messages per lookup", _fmt(s["messages_per_lookup"])),
        ("messages per provide", _fmt(s["messages_per_provide"])),
        ("reprovide messages per key", f"{_fmt(s['reprovide_messages_per_key'])} "
                                       f"({_fmt(s['reprovide_keys'])} keys from one node; "
                                       f"held by {_fmt(s['reprovide_held_median'])} of the "
                                       f"k closest, min {_fmt(s['reprovide_held_min'])})"),
        ("join", f"{_fmt(s['join_seconds'], ' s')} simulated, "
                 f"{_fmt(s['join_messages_per_node'])} messages/node"),
        ("background msgs/node/hour", _fmt(s["background_messages_per_node_hour"])),
        ("churn replacements", _fmt(s["churn_replacements"])),
        *([("provider-record flood", f"{s['flood_keys_sent']} keys sent; honest stores full "
                                     f"{s['flood_honest_stores_full']}, records refused "
                                     f"{s['flood_refused_by_honest']}")]
          if s.get("flood_keys_sent") else []),
        ("handler errors", _fmt(s["handler_errors"])),
        ("wall time", f"{r['wall_seconds']:.1f} s"),
        ("peak RSS", f"{r['peak_rss_bytes'] / 2**20:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write(report: dict, out: Path) -> list[Path]:
    """Write report.json and the plots into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return [path, *plot(report, out)]


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")                   # files only, no display
    import matplotlib.pyplot as plt

    m, name = report["metrics"], report["scenario"]["name"]
    lookups = [r for r in m["lookups"] if not r["requester_left"]]
    paths = [out / p for p in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 4))
    hops = [r["hops"] for r in lookups]
    if hops:
        ax.hist(hops, bins=range(0, max(hops) + 2), align="left", rwidth=0.8)
    ax.set(title=f"{name}: find-providers hops", xlabel="hops", ylabel="lookups")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    lat = sorted(1000 * r["latency"] for r in lookups)
    if lat:
        ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post")
    ax.set(title=f"{name}: find-providers latency CDF", xlabel="latency (simulated ms)",
           ylabel="fraction of lookups", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if lookups:
        lo, hi = lookups[0]["t"], lookups[-1]["t"]
        bins = 10
        width = (hi - lo) / bins or 1.0
        xs, ys = [], []
        for b in range(bins):
            rs = [r for r in lookups
                  if lo + b * width <= r["t"] < lo + (b + 1) * width
                  or (b == bins - 1 and r["t"] == hi)]
            if rs:
                xs.append((lo + (b + 0.5) * width) / 60)
                ys.append(sum(r["ok"] for r in rs) / len(rs))
        ax.plot(xs, ys, marker="o")
    ax.set(title=f"{name}: find-providers success over time",
           xlabel="simulated minutes since the join", ylabel="success rate", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rep = m.get("reprovide") or {}
    single = [r["requests"] for r in m["provides"]]
    bars = [("one provide\n(walk + k AddProvider)",
             statistics.mean(single) if single else 0.0)]
    if rep:
        bars.append((f"provide_many sweep\n({rep['keys']} keys)", rep["requests_per_key"]))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["tab:gray", "tab:blue"][:len(bars)])
    for i, (_, v) in enumerate(bars):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set(title=f"{name}: messages per provided key", ylabel="requests per key (log)")
    fig.tight_layout()
    fig.savefig(paths[3], dpi=100)
    plt.close(fig)
    return paths
