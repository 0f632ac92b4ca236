"""Draws the benchmark's chart: latency percentiles and throughput per path."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
paths = [p for p in ["direct", "llm-egress", "envoy", "nginx"] if p in results["paths"]]
data = results["paths"]

fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
quantiles = [("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9")]
width = 0.8 / len(paths)
for i, p in enumerate(paths):
    xs = [q + i * width for q in range(len(quantiles))]
    lat.bar(xs, [data[p].get(k, 0) / 1000 for k, _ in quantiles], width, label=p)
lat.set_xticks([q + width * (len(paths) - 1) / 2 for q in range(len(quantiles))])
lat.set_xticklabels([label for _, label in quantiles])
lat.set_ylabel("latency at %s req/s (ms)" % results["options"]["rate"])
lat.set_title("Latency")
lat.legend()

conns = [("sat_1", "1 conn"), ("sat_16", "16 conns"), ("sat_64", "64 conns"), ("newconn_rps", "new conn each")]
for i, p in enumerate(paths):
    xs = [q + i * width for q in range(len(conns))]
    thr.bar(xs, [data[p].get(k, 0) for k, _ in conns], width, label=p)
thr.set_xticks([q + width * (len(paths) - 1) / 2 for q in range(len(conns))])
thr.set_xticklabels([label for _, label in conns])
thr.set_ylabel("requests per second")
thr.set_title("Throughput")
m = results["machine"]
fig.suptitle("llm-egress vs direct, Envoy (ASM-style) and nginx - %s, %s cores, kernel %s" % (results["date"], m["cores"], m["kernel"]))
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
