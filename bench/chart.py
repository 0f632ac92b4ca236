"""Draws the benchmark's chart: latency and throughput per path, then the
cost curves (memory with held connections, the gateway with more
policies and routes, the agent with more enrolled pods)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
data = results.get("paths", {})
paths = [p for p in ["direct", "llm-egress", "envoy", "nginx", "litellm"] if p in data]

fig, axes = plt.subplots(2, 3, figsize=(17, 9))
(lat, thr, mem), (res, rel, pods) = axes

if paths:
    quantiles = [("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9")]
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        xs = [q + i * width for q in range(len(quantiles))]
        lat.bar(xs, [data[p].get(k, 0) / 1000 for k, _ in quantiles], width, label=p)
    lat.set_xticks([q + width * (len(paths) - 1) / 2 for q in range(len(quantiles))])
    lat.set_xticklabels([label for _, label in quantiles])
    lat.set_yscale("log")
    lat.set_ylabel("latency at %s req/s (ms, log)" % results["options"]["rate"])
    lat.set_title("Latency")
    lat.legend()

    tpaths = paths + (["ceiling"] if "ceiling" in data else [])
    width = 0.8 / len(tpaths)
    conns = [("sat_1", "1 conn"), ("sat_16", "16 conns"), ("sat_64", "64 conns"), ("newconn_rps", "new conn each")]
    for i, p in enumerate(tpaths):
        xs = [q + i * width for q in range(len(conns))]
        thr.bar(xs, [data[p].get(k, 0) for k, _ in conns], width, label=p, hatch="//" if p == "ceiling" else None)
    thr.set_xticks([q + width * (len(tpaths) - 1) / 2 for q in range(len(conns))])
    thr.set_xticklabels([label for _, label in conns])
    thr.set_ylabel("requests per second")
    thr.set_title("Throughput (ceiling: the provider over plain HTTP)")
    thr.legend(fontsize=7)

points = results.get("memory", {}).get("points", [])
if points:
    xs = [max(p["connections"], 0.5) for p in points]
    mem.plot(xs, [p["agent_kb"] / 1024 for p in points], "o-", label="agent")
    mem.plot(xs, [p["gateway_kb"] / 1024 for p in points], "s-", label="gateway")
    mem.set_xscale("log")
    mem.set_xlabel("held captured connections (0 drawn at 0.5)")
    mem.set_ylabel("RSS (MiB)")
    mem.set_title("Memory vs connections")
    mem.legend()

curves = results.get("curves", {})
g = curves.get("gateway_resources", {}).get("points", [])
if g:
    xs = [max(p["policies"], 0.5) for p in g]
    res.plot(xs, [p["p50_us"] / 1000 for p in g], "o-", label="p50 at fixed rate (ms)")
    res.plot(xs, [p["p99_us"] / 1000 for p in g], "^-", label="p99 at fixed rate (ms)")
    res.set_xscale("log")
    res.set_xlabel("AuthorizationPolicies (+ as many LLMRoutes)")
    res.set_ylabel("ms")
    res.set_title("Gateway latency vs configuration size")
    res.legend()
    rel.plot(xs, [p["reload_ms"] for p in g], "o-", label="reload (ms)")
    rel.plot(xs, [p["gateway_kb"] / 1024 for p in g], "s-", label="gateway RSS (MiB)")
    rel.set_xscale("log")
    rel.set_yscale("log")
    rel.set_xlabel("AuthorizationPolicies (+ as many LLMRoutes)")
    rel.set_title("Reload time and memory vs configuration size")
    rel.legend()
e = curves.get("enrolled_pods", {}).get("points", [])
if e:
    xs = [p["pods"] for p in e]
    pods.plot(xs, [p["agent_kb"] / 1024 for p in e], "o-", label="agent RSS (MiB)")
    pods.plot(xs, [p["agent_cpu_ms"] for p in e], "s-", label="agent CPU to apply (ms)")
    pods.set_xscale("log")
    pods.set_xlabel("enrolled pods (cgroups)")
    pods.set_title("Agent vs enrolled pods")
    pods.legend()

for ax in axes.flat:
    if not ax.has_data():
        ax.set_axis_off()
m = results["machine"]
fig.suptitle("llm-egress vs direct, Envoy (ASM-style), nginx and LiteLLM - %s, %s cores, kernel %s" % (results["date"], m["cores"], m["kernel"]))
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
