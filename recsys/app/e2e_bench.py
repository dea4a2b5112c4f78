"""`recsys bench e2e`: the cascade under open-loop load, as users feel it, printed as JSON with plots.

Starts the three services the way `make run` does (recall, rank, gateway as separate processes on
loopback), the same cascade in one process (``recsys.app.inprocess``: the gateway with in-process
recall and rank, no gRPC hops), one such process per core, pinned to it, over one history file,
called round-robin (``inprocess_replicas``), and the two-process deployment (recall, and the
gateway with the ranker in-process: one internal hop), then sweeps arrival rates from low to
saturation. At each rate the stacks are measured one after the other, ``--repeats`` times, the
order reversed at every turn (ABBA), each by an open-loop Poisson load generator in its own process
(``recsys.app.loadgen``: latency from the scheduled send time). Per stack, scenario and rate:
p50/p95/p99, errors, degraded share, and the CPU seconds each service process used per request
(from /proc, the source of ``process_cpu_seconds_total``), split by thread (the services name
their batch threads in the kernel: ``main`` is the event loop), and how many requests the
gateway's calls to recall and rank carried (from its ``/metrics``): every request of every repeat
pooled (one bad repeat shows in the p99 and the errors), each repeat's own figures kept (``repeats``),
since this host drifts by tens of percent within minutes. A stack's sweep stops at its first rate
that misses the saturation criteria (no errors, <= 1% degraded, p99 <= --saturation-p99-ms).

    recsys bench e2e --artifacts artifacts --out artifacts/bench/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.app import count_at_least
from recsys.app.loadgen import gateway_target, latency_summary
from recsys.app.run import (
    HISTORY_LENGTH,
    HOST,
    SERVING_TIMEOUT_S,
    Service,
    build_bundles,
    dev_credentials,
    pick_port,
    seed_history_store,
)
from recsys.grpc_env import GRPC_EXPERIMENTS_VARIABLE
from recsys.timing import machine_info, process_cpu_seconds, thread_cpu_seconds

DEFAULT_RATES = "50,100,200,300,400,500,600,800"
BARS = {
    "home_at_200": {"p99_ms_at_most": 25.0, "errors": 0, "degraded_share_at_most": 0.01},
    "cpu_ms_per_request_at_200_at_most": 4.0,
    "saturation_rps_at_least": 400,
    "grpc_over_inprocess_at_most": 1.5,
}


STACKS = {
    "grpc": "recall, rank, gateway: three processes on loopback, as `make run` starts them",
    "grpc_per_call": "the same three processes, the gateway making one call per request to recall "
    "and to rank (--downstream-in-flight 0: no batch calls)",
    "inprocess": "one process: the gateway with in-process recall and rank (recsys.app.inprocess)",
    "rank_in_gateway": "two processes: recall, and the gateway with the ranker in-process "
    "(recsys.app.inprocess --rank-bundle): one internal hop",
    "inprocess_replicas": "--replicas processes (default: one per core), each the whole cascade "
    "(recsys.app.inprocess) pinned to its own core (RECSYS_CPU_AFFINITY), over one shared history "
    "store, called round-robin: no internal hop and no single GIL",
    "grpc_event_engine": "the same three processes on gRPC's default I/O (EventEngine; GRPC_EXPERIMENTS "
    "empty) instead of the services' setting (recsys.grpc_env)",
}
# The gateway's histogram of requests per call to recall and rank (gateway/metrics.py).
DOWNSTREAM_CALL_METRIC = "recsys_gateway_downstream_call_requests"
# What `--stacks` runs unless told: every stack but the one that only checks a gRPC setting.
DEFAULT_STACKS = "grpc,grpc_per_call,inprocess,inprocess_replicas,rank_in_gateway"


@dataclass
class Stack:
    """One way of running the cascade: its processes and the gateway they answer on."""

    name: str
    services: list[Service]
    gateways: list[Service]  # what the load generator calls, round-robin when more than one

    @property
    def target(self) -> str:
        """The gRPC target of the stack's gateways (``ipv4:`` list for more than one)."""
        return gateway_target([gateway.address for gateway in self.gateways])

    def start(self) -> None:
        for service in self.services:
            service.start()
        for service in self.services:
            service.wait_serving(SERVING_TIMEOUT_S)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system, all threads) each process used so far."""
        return {service.name: service_cpu_seconds(service) for service in self.services}

    def thread_cpu_seconds(self) -> dict[str, dict[str, float]]:
        """Each process's CPU time so far by thread name (:func:`recsys.timing.thread_cpu_seconds`)."""
        seconds = {}
        for service in self.services:
            assert service.process is not None
            seconds[service.name] = thread_cpu_seconds(service.process.pid)
        return seconds

    def downstream_calls(self) -> dict[str, tuple[float, float]]:
        """recall / rank -> (calls, requests) the gateways have sent so far, from their /metrics;
        empty for gateways that make no calls (recall and rank in-process) or cannot be read."""
        totals: dict[str, tuple[float, float]] = {}
        for gateway in self.gateways:
            for service, (calls, requests) in scrape_downstream_calls(gateway.metrics_port).items():
                before = totals.get(service, (0.0, 0.0))
                totals[service] = (before[0] + calls, before[1] + requests)
        return totals


def scrape_downstream_calls(metrics_port: int, timeout_s: float = 5.0) -> dict[str, tuple[float, float]]:
    """recall / rank -> (calls, requests) from the gateway's ``/metrics`` on ``metrics_port``
    (its histogram of requests per call: count and sum); empty when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=timeout_s) as reply:
            text = reply.read().decode("utf-8")
    except OSError:
        return {}
    calls: dict[str, float] = {}
    requests: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != DOWNSTREAM_CALL_METRIC:
            continue
        for sample in family.samples:
            service = sample.labels.get("service", "")
            if sample.name.endswith("_count"):
                calls[service] = calls.get(service, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                requests[service] = requests.get(service, 0.0) + sample.value
    return {service: (calls[service], requests.get(service, 0.0)) for service in calls}


def calls_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict:
    """recall / rank -> calls, requests and requests per call sent between two scrapes."""
    sent = {}
    for service, (calls, requests) in sorted(after.items()):
        calls -= before.get(service, (0.0, 0.0))[0]
        requests -= before.get(service, (0.0, 0.0))[1]
        sent[service] = {
            "calls": int(calls),
            "requests": int(requests),
            "requests_per_call": round(requests / calls, 2) if calls > 0 else None,
        }
    return sent


def ms_per_request_by_thread(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], sent: int
) -> dict[str, dict[str, float]]:
    """service -> thread name -> CPU ms per request between two readings, busiest first (threads
    under 0.001 ms per request left out)."""
    by_service = {}
    for service, threads in after.items():
        used = {
            thread: round((seconds - before.get(service, {}).get(thread, 0.0)) * 1000 / sent, 3)
            for thread, seconds in threads.items()
        }
        by_service[service] = {
            thread: ms for thread, ms in sorted(used.items(), key=lambda item: -item[1]) if ms >= 0.001
        }
    return by_service


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where the OS cannot tell)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def service_cpu_seconds(service: Service) -> float:
    assert service.process is not None
    return process_cpu_seconds(service.process.pid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--rates", default=DEFAULT_RATES, help="arrival rates to sweep, req/s")
    parser.add_argument("--scenarios", default="home,item_detail")
    parser.add_argument(
        "--stacks",
        default=DEFAULT_STACKS,
        help="comma list of: " + ", ".join(f"{name} ({what})" for name, what in STACKS.items()),
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per rate")
    parser.add_argument(
        "--repeats",
        type=count_at_least(1),
        default=3,
        help="runs per stack and rate, interleaved, then pooled",
    )
    parser.add_argument(
        "--replicas",
        type=count_at_least(1),
        default=len(usable_cpus()),
        help="processes of the inprocess_replicas stack (default: one per core this process may use)",
    )
    parser.add_argument("--users", type=int, default=1000, help="known users the requests are for")
    parser.add_argument("--deadline-ms", type=float, default=500.0, help="client deadline")
    parser.add_argument("--saturation-p99-ms", type=float, default=100.0)
    parser.add_argument(
        "--calibration-requests",
        type=count_at_least(0),
        default=400,
        help="`home` requests of `recsys bench cpu` before and after the sweep, recording the host's "
        "speed at both ends (0 = skip)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (plots beside it)")
    return parser


def host_calibration(args: argparse.Namespace) -> float | None:
    """CPU ms per `home` request of the in-process cascade (``recsys bench cpu``, its own process):
    the same work at the start and the end of a sweep, so a host that changed speed meanwhile shows
    (shared VMs drift by tens of percent within minutes). None when skipped or it failed."""
    if not args.calibration_requests:
        return None
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "cpu.json"
        command = [
            sys.executable, "-m", "recsys.app.cli", "bench", "cpu", "--data", args.data,
            "--artifacts", str(args.artifacts), "--scenarios", "home", "--requests",
            str(args.calibration_requests), "--warmup", "100", "--profile-requests", "0",
            "--hop-bytes", "", "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.is_file():
            print(f"host calibration failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        return float(json.loads(out.read_text())["scenarios"]["home"]["cpu_ms_per_request"])


def start_stacks(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Stack], Path, Path, Path]:
    """Bundles, seeded history, token and the stacks asked for (started); returns stacks, token,
    users, items."""
    wanted = args.stacks.split(",")
    unknown = set(wanted) - set(STACKS)
    if unknown:  # before minutes of bundle building
        raise SystemExit(f"recsys bench e2e: unknown stacks {sorted(unknown)}; known: {list(STACKS)}")
    recall_dir, rank_dir, dataset = build_bundles(args.data, args.artifacts, quick=True)
    root = recall_dir.parent
    sqlite_path = root / "bench-history.sqlite3"
    seed_history_store(dataset, sqlite_path, HISTORY_LENGTH)
    token_path, tokens_path = dev_credentials(args.artifacts)
    users = workdir / "users.txt"
    users.write_text("\n".join(dataset.users.ids[: args.users]) + "\n")
    items = workdir / "items.txt"
    items.write_text("\n".join(dataset.items.ids) + "\n")
    gateway_args = [
        "--no-http",  # the load goes over gRPC; two gateways must not race for one HTTP port
        "--auth-tokens-file",
        str(tokens_path),
        "--max-history-length",
        str(HISTORY_LENGTH),
        "--sqlite-path",
        str(sqlite_path),
    ]
    logs = root / "logs" / "bench"
    taken: set[int] = set()
    stacks: dict[str, Stack] = {}

    def service(
        name: str, module: str, service_args: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> Service:
        return Service(
            name, module, pick_port(0, taken), pick_port(0, taken), service_args, logs / log_name, env or {}
        )

    recall_args, rank_args = ["--bundle", str(recall_dir)], ["--bundle", str(rank_dir)]

    def three_processes(
        name: str, log_prefix: str, extra_gateway_args: list[str], env: dict[str, str] | None = None
    ) -> Stack:
        recall = service("recall", "recall_service", recall_args, f"{log_prefix}recall.log", env)
        rank = service("rank", "rank_service", rank_args, f"{log_prefix}rank.log", env)
        remote = ["--recall-address", recall.address, "--rank-address", rank.address]
        gateway_command = [*gateway_args, *remote, *extra_gateway_args]
        gateway = service("gateway", "gateway", gateway_command, f"{log_prefix}gateway.log", env)
        return Stack(name, [recall, rank, gateway], [gateway])

    if "grpc" in wanted:
        stacks["grpc"] = three_processes("grpc", "", [])
    if "grpc_per_call" in wanted:
        per_call = ["--downstream-in-flight", "0"]  # no batch calls
        stacks["grpc_per_call"] = three_processes("grpc_per_call", "per_call-", per_call)
    if "grpc_event_engine" in wanted:
        engine = {GRPC_EXPERIMENTS_VARIABLE: ""}  # empty: gRPC's own defaults
        stacks["grpc_event_engine"] = three_processes("grpc_event_engine", "event_engine-", [], engine)
    whole_cascade = ["--recall-bundle", str(recall_dir), "--rank-bundle", str(rank_dir), *gateway_args]
    if "inprocess" in wanted:
        single = service("inprocess", "recsys.app.inprocess", whole_cascade, "inprocess.log")
        stacks["inprocess"] = Stack("inprocess", [single], [single])
    if "rank_in_gateway" in wanted:
        recall = service("recall", "recall_service", recall_args, "rank_in_gateway-recall.log")
        mixed = ["--rank-bundle", str(rank_dir), "--recall-address", recall.address]
        gateway = service("gateway", "recsys.app.inprocess", [*mixed, *gateway_args], "rank_in_gateway.log")
        stacks["rank_in_gateway"] = Stack("rank_in_gateway", [recall, gateway], [gateway])
    if "inprocess_replicas" in wanted:
        # Replica i on the i-th CPU this process may use (RECSYS_CPU_AFFINITY), round-robin past them.
        cpus, can_pin = usable_cpus(), hasattr(os, "sched_setaffinity")
        replicas = [
            service(
                f"cascade_{number}",
                "recsys.app.inprocess",
                whole_cascade,
                f"replica-{number}.log",
                {"RECSYS_CPU_AFFINITY": str(cpus[number % len(cpus)])} if can_pin else {},
            )
            for number in range(args.replicas)
        ]
        stacks["inprocess_replicas"] = Stack("inprocess_replicas", replicas, replicas)
    try:
        for stack in stacks.values():
            stack.start()
    except BaseException:  # never leave a half-started stack's processes behind
        for stack in stacks.values():
            stack.stop()
        raise
    return stacks, token_path, users, items


def measure(
    stack: Stack, scenario: str, rate: float, args: argparse.Namespace, token: Path, users: Path, items: Path
) -> dict:
    """One open-loop run against ``stack``: the load generator's JSON plus CPU per request."""
    command = [
        sys.executable, "-m", "recsys.app.loadgen", "--gateway", stack.target,
        "--token-file", str(token), "--rate", str(rate), "--duration", str(args.duration),
        "--warmup", str(args.warmup), "--scenario", scenario, "--users", str(users),
        "--items", str(items), "--deadline-ms", str(args.deadline_ms), "--samples",
    ]  # fmt: skip
    before, threads_before = stack.cpu_seconds(), stack.thread_cpu_seconds()
    calls_before = stack.downstream_calls()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    after, threads_after = stack.cpu_seconds(), stack.thread_cpu_seconds()
    calls_after = stack.downstream_calls()
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    sent = max(result["sent"], 1)
    per_service = {name: round((after[name] - before[name]) * 1000 / sent, 3) for name in after}
    result["cpu_ms_per_request"] = {**per_service, "total": round(sum(per_service.values()), 3)}
    result["cpu_ms_per_request_by_thread"] = ms_per_request_by_thread(threads_before, threads_after, sent)
    if calls_after:
        result["downstream_calls"] = calls_between(calls_before, calls_after)
    return result


def combine_repeats(results: list[dict]) -> dict:
    """One entry for the runs of one stack, scenario and rate, their requests pooled: latency
    percentiles over every measured request of every repeat (``latency_samples_ms``; the median
    of each percentile for runs without samples), errors, outcomes and degraded reasons summed,
    shares over all requests, CPU per request over all requests sent; each repeat's own
    p50/p99/errors/degraded/CPU kept in ``repeats``. The samples themselves are dropped."""
    runs = [{key: value for key, value in r.items() if key != "latency_samples_ms"} for r in results]
    if len(runs) == 1:
        return runs[0]
    combined = dict(runs[0])
    requests = sum(r["requests"] for r in runs)
    sent = [r["sent"] for r in runs]
    combined["requests"], combined["sent"] = requests, sum(sent)
    combined["errors"] = sum(r["errors"] for r in runs)
    combined["achieved_rps"] = round(float(statistics.median(r["achieved_rps"] for r in runs)), 1)

    def per_sent(values: list[float]) -> float:
        return round(sum(v * n for v, n in zip(values, sent, strict=True)) / max(sum(sent), 1), 3)

    combined["error_share"] = round(combined["errors"] / requests, 4) if requests else 0.0
    degraded = sum(r["degraded_share"] * r["requests"] for r in runs)
    combined["degraded_share"] = round(degraded / requests, 4) if requests else 0.0
    combined["loadgen_cpu_ms_per_request"] = per_sent([r["loadgen_cpu_ms_per_request"] for r in runs])
    combined["cpu_ms_per_request"] = {
        key: per_sent([r["cpu_ms_per_request"][key] for r in runs]) for key in runs[0]["cpu_ms_per_request"]
    }
    combined.pop("cpu_ms_per_request_by_thread", None)  # pooled below when every repeat has them
    combined.pop("downstream_calls", None)
    if all("cpu_ms_per_request_by_thread" in r for r in runs):
        by_thread: dict[str, dict[str, float]] = {}
        for service in runs[0]["cpu_ms_per_request_by_thread"]:
            threads = [r["cpu_ms_per_request_by_thread"].get(service, {}) for r in runs]
            names = {name for used in threads for name in used}
            pooled = {name: per_sent([used.get(name, 0.0) for used in threads]) for name in names}
            by_thread[service] = dict(sorted(pooled.items(), key=lambda item: -item[1]))
        combined["cpu_ms_per_request_by_thread"] = by_thread
    if all("downstream_calls" in r for r in runs):
        totals: dict[str, tuple[float, float]] = {}
        for run in runs:
            for service, counts in run["downstream_calls"].items():
                calls, requests = totals.get(service, (0.0, 0.0))
                totals[service] = (calls + counts["calls"], requests + counts["requests"])
        combined["downstream_calls"] = calls_between({}, totals)
    samples = [r.get("latency_samples_ms") for r in results]
    if all(s is not None for s in samples):
        pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples])
        combined["latency_ms"] = latency_summary(pooled)
    else:
        combined["latency_ms"] = {
            key: round(float(statistics.median(r["latency_ms"][key] for r in runs)), 3)
            for key in runs[0]["latency_ms"]
        }
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for run in runs:
        outcomes.update(run["outcomes"])
        reasons.update(run.get("degraded_reasons", {}))
    combined["outcomes"], combined["degraded_reasons"] = dict(outcomes), dict(reasons)
    combined["repeats"] = [
        {
            "p50": r["latency_ms"]["p50"],
            "p99": r["latency_ms"]["p99"],
            "errors": r["errors"],
            "degraded_share": r["degraded_share"],
            "cpu_ms_per_request": r["cpu_ms_per_request"]["total"],
        }
        for r in runs
    ]
    return combined


def report_progress(name: str, scenario: str, rate: float, result: dict) -> None:
    latency = result["latency_ms"]
    print(
        f"{name:<15} {scenario:<11} {rate:>5.0f} req/s: "
        f"p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms, errors {result['errors']}, "
        f"degraded {result['degraded_share']:.1%}, CPU {result['cpu_ms_per_request']['total']:.2f} ms/req",
        file=sys.stderr,
        flush=True,
    )


def passes(result: dict, p99_ms: float) -> bool:
    return (
        result["errors"] == 0 and result["degraded_share"] <= 0.01 and result["latency_ms"]["p99"] <= p99_ms
    )


def ratios_between(runs: dict, stack: str, other: str, scenarios: list[str]) -> dict:
    """scenario -> rate -> ``stack``'s p50, p99 and CPU per request over ``other``'s at that rate."""
    ratios: dict = {}
    for scenario in scenarios:
        ratios[scenario] = {}
        theirs = {run["rate"]: run for run in runs.get(other, {}).get(scenario, [])}
        for run in runs.get(stack, {}).get(scenario, []):
            base = theirs.get(run["rate"])
            if base is None:
                continue
            ratios[scenario][f"{run['rate']:g}"] = {
                "p50": round(run["latency_ms"]["p50"] / max(base["latency_ms"]["p50"], 1e-9), 2),
                "p99": round(run["latency_ms"]["p99"] / max(base["latency_ms"]["p99"], 1e-9), 2),
                "cpu_per_request": round(
                    run["cpu_ms_per_request"]["total"] / max(base["cpu_ms_per_request"]["total"], 1e-9), 2
                ),
            }
    return ratios


def summarise(runs: dict, stacks: list[str], scenarios: list[str], p99_ms: float) -> dict:
    """Saturation per stack and scenario, the issue's bars, and the gRPC/in-process ratios."""
    saturation = {
        stack: {
            scenario: max(
                (r["rate"] for r in runs[stack][scenario] if passes(r, p99_ms)),
                default=0,
            )
            for scenario in scenarios
        }
        for stack in stacks
    }
    summary: dict = {"saturation_rps": saturation}

    def at(stack: str, scenario: str, rate: float) -> dict | None:
        return next((r for r in runs.get(stack, {}).get(scenario, []) if r["rate"] == rate), None)

    ratios = ratios_between(runs, "grpc", "inprocess", scenarios)
    summary["grpc_over_inprocess"] = ratios
    if "grpc_per_call" in runs:  # what the gateway's batch calls buy, in the same run
        summary["grpc_over_grpc_per_call"] = ratios_between(runs, "grpc", "grpc_per_call", scenarios)
    if "grpc_event_engine" in runs:  # what the services' gRPC I/O setting buys, in the same run
        summary["grpc_over_grpc_event_engine"] = ratios_between(runs, "grpc", "grpc_event_engine", scenarios)
    home = at("grpc", "home", 200)
    if home is not None:
        ratio = ratios.get("home", {}).get("200", {})
        summary["bars"] = {
            "home_at_200": {
                "p99_ms": home["latency_ms"]["p99"],
                "errors": home["errors"],
                "degraded_share": home["degraded_share"],
                "met": home["errors"] == 0
                and home["degraded_share"] <= 0.01
                and home["latency_ms"]["p99"] <= BARS["home_at_200"]["p99_ms_at_most"],
            },
            "cpu_ms_per_request_at_200": {
                "value": home["cpu_ms_per_request"]["total"],
                "met": home["cpu_ms_per_request"]["total"] <= BARS["cpu_ms_per_request_at_200_at_most"],
            },
            "saturation_rps": {
                "value": saturation["grpc"]["home"],
                "met": saturation["grpc"]["home"] >= BARS["saturation_rps_at_least"],
            },
            "grpc_over_inprocess_at_200": {
                **ratio,
                "met": bool(ratio) and ratio["p50"] <= BARS["grpc_over_inprocess_at_most"],
            },
        }
    return summary


def plot(report: dict, path: Path) -> list[str]:
    """Latency and CPU per request against the arrival rate, one line per stack and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stack, by_scenario in report["runs"].items():
        for scenario, runs in by_scenario.items():
            rates = [r["rate"] for r in runs]
            label = f"{stack} {scenario}"
            latency.plot(rates, [r["latency_ms"]["p50"] for r in runs], "o-", label=f"{label} p50")
            latency.plot(rates, [r["latency_ms"]["p99"] for r in runs], "x--", label=f"{label} p99")
            cpu.plot(rates, [r["cpu_ms_per_request"]["total"] for r in runs], "o-", label=label)
    latency.set(
        xlabel="arrival rate (req/s, Poisson)", ylabel="latency from scheduled send (ms)", yscale="log"
    )
    latency.axhline(25, color="grey", linewidth=0.8, linestyle=":")
    cpu.set(xlabel="arrival rate (req/s)", ylabel="CPU ms per request (all service processes)")
    cpu.axhline(4, color="grey", linewidth=0.8, linestyle=":")
    for axes in (latency, cpu):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    machine = report["machine"]
    figure.suptitle(
        f"recsys cascade, open-loop load — {machine['cpu']}, {machine['cores']} cores", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [str(path)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    scenarios = [s for s in args.scenarios.split(",") if s]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        stacks, token, users, items = start_stacks(args, Path(workdir))
        calibration = {"before_ms": host_calibration(args)}
        names = list(stacks)
        runs: dict[str, dict[str, list[dict]]] = {name: {s: [] for s in scenarios} for name in names}
        try:
            for scenario in scenarios:
                saturated: set[str] = set()
                turn = 0
                for rate in rates:
                    live = [name for name in names if name not in saturated]
                    measured: dict[str, list[dict]] = {name: [] for name in live}
                    for _ in range(args.repeats):
                        order = live if turn % 2 == 0 else live[::-1]  # ABBA: neither always goes first
                        turn += 1
                        for name in order:
                            result = measure(stacks[name], scenario, rate, args, token, users, items)
                            measured[name].append(result)
                            report_progress(name, scenario, rate, result)
                    for name in live:
                        result = combine_repeats(measured[name])
                        runs[name][scenario].append(result)
                        if not passes(result, args.saturation_p99_ms):
                            saturated.add(name)
                    if len(saturated) == len(names):
                        break
            calibration["after_ms"] = host_calibration(args)
        finally:
            for stack in stacks.values():
                stack.stop()
    report = {
        "benchmark": "e2e: gateway -> recall -> rank under open-loop Poisson load",
        "command": "recsys bench e2e " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "settings": {
            "rates": rates,
            "scenarios": scenarios,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "users": args.users,
            "deadline_ms": args.deadline_ms,
            "saturation": f"no errors, <= 1% degraded, p99 <= {args.saturation_p99_ms:g} ms",
            "stacks": {name: STACKS[name] for name in names},
            "load_generator": "recsys.app.loadgen in its own process on the same machine",
        },
        "bars": BARS,
        "host_calibration": {
            "what": "CPU ms per `home` request of the in-process cascade (recsys bench cpu), before and "
            "after the sweep: the host's speed at both ends",
            **calibration,
        },
        "runs": runs,
        "summary": summarise(runs, names, scenarios, args.saturation_p99_ms),
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report["plots"] = plot(report, args.out.with_suffix(".png"))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
