#!/usr/bin/env python3
"""The ipevents benchmark: how fast the server takes datagrams, measured against the kernel's
own limit (the `discard` receiver), and what it costs in query latency, memory and CPU.

Run it from anywhere, as one command:

    python3 tools/bench/bench.py [--quick] [--runs 3] [--out bench-out]

It builds the release binaries (`cargo build --release --features tools --bins`, skipped
with `--no-build`), starts every receiver itself on 127.0.0.1 ports chosen by the kernel, and
writes `bench-out/report.md` (also printed) and `bench-out/loss.svg`, with the logs of every
process in `bench-out/logs/`. Every figure is the median of `--runs` runs (3; 1 with
`--quick`), with min and max. It needs Python 3 and its standard library only; the plot is
drawn with matplotlib when it is installed (Debian: `apt-get install python3-matplotlib`, for
the system `python3`), and written as a plain SVG otherwise. All traffic stays on loopback. A full run takes about 45 minutes after the build, two thirds of
it step 7 (about 10 minutes a run, plus two builds of the server the first time); `--quick`
a few minutes.

The helpers' unit tests: `PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s tools/bench`.

What it measures, in order:

1. Receiver capacity (the headline). The receiver is stopped with SIGSTOP, `loadgen
   --send-only` queues N datagrams in its sockets (1 GiB receive buffers hold them) from the
   first CPU, where each receiver's first worker runs, and the time from SIGCONT until
   /metrics counts all N gives events/s with no sender in the way. Server and discard, one
   worker and one per core, each steering mode; `--calibrate` runs this step alone with
   discard in both seats, to show the step's own error. Then `microbench`
   (also with `--capacity-only`): the worker's own parse + apply per datagram without the
   kernel, for the reference mix and many apps, and the hex decode and hash alone. Then
   (also with `--capacity-only`, or alone with `--profile-only`; needs `perf`) the worker's
   user-space time per datagram in the real server, from `perf record` of one worker
   draining queued datagrams, and the same profile of discard's worker, to show part by part
   (user space, copy, skb frees, UDP queue, the recvmmsg call) where the server's time per
   datagram differs from the kernel's own limit (`perf_profile.py`).
2. Lossless paced rate: the highest `--rate` at which at least 99.99% of the datagrams arrive,
   found by doubling from 100k/s and then bisecting; every trial goes into loss.svg.
3. Query latency while 100,000 apps are being written at half the lossless rate.
4. Memory: RSS per stored (app, ip) pair with every pair of a million apps loaded, the time of
   `DELETE /events`, and RSS after it.
5. The reference scenario at the load test's scale (33,000 datagrams/s): loss and CPU.
6. Cluster mode (`cluster.py`, when redis-server is installed): a 3-primary Redis Cluster on
   loopback; a node's capacity in cluster mode against standalone, two nodes, store writes
   per event, the flush rate of distinct pairs, and query latency through the store.
7. One node at full scale (`scale.py`; also with `--scale-only`), each against its goal: RSS
   growth with 4 workers against 1; capacity with the default steering against `random`
   from one sender socket; the longest batch while 2,000,000 new apps arrive; the time of
   `DELETE /events` and the memory given back after it, for each allocator the server can be
   built with (glibc's, `alloc-mimalloc`, `alloc-jemalloc`; each built into its own target
   directory under the bench's); bytes per pair with a million apps of 16 IPs; and the RSS
   rise while a snapshot is written.
"""

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The helper modules sit next to this script; compiling them would leave __pycache__ in the
# source tree.
sys.dont_write_bytecode = True

import cluster  # noqa: E402 (after the line above on purpose)
import perf_profile  # noqa: E402
import report as fmt  # noqa: E402
import scale  # noqa: E402
import sections  # noqa: E402
import steps  # noqa: E402
from loadgen import Loadgen  # noqa: E402
from plot import write_loss_plot  # noqa: E402
from receiver import BenchError, Receiver, stop_all  # noqa: E402
from steps import RECEIVERS, SEARCH_START_PER_S, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    """How big each step is: the full benchmark, or the quick one that only proves it works."""

    quick: bool
    runs: int
    seed: int
    cores: int
    capacity_count: int
    search_count: int
    search_max_s: float
    query_apps: int
    query_load_count: int
    query_duration_s: float
    memory_apps: int
    reference_duration_s: float
    scale_workers_apps: int
    scale_growth_apps: int
    scale_reset_apps: int

    @staticmethod
    def of(args):
        cores = len(os.sched_getaffinity(0))
        runs = args.runs if args.runs is not None else (1 if args.quick else 3)
        if args.quick:
            sizes = dict(capacity_count=100_000, search_count=200_000, search_max_s=10,
                         query_apps=10_000, query_load_count=200_000, query_duration_s=5,
                         memory_apps=100_000, reference_duration_s=5,
                         scale_workers_apps=10_000, scale_growth_apps=100_000,
                         scale_reset_apps=50_000)
        else:
            sizes = dict(capacity_count=1_000_000, search_count=2_000_000, search_max_s=30,
                         query_apps=100_000, query_load_count=2_000_000, query_duration_s=20,
                         memory_apps=1_000_000, reference_duration_s=60,
                         scale_workers_apps=200_000, scale_growth_apps=2_000_000,
                         scale_reset_apps=1_000_000)
        return Settings(quick=args.quick, runs=runs, seed=args.seed, cores=cores, **sizes)


class Bench:
    """The binaries, the output directory, and the notes the steps leave for the report."""

    def __init__(self, settings, target_dir, out, may_build=True):
        self.settings = settings
        self.target_dir = target_dir
        self.may_build = may_build
        self.binaries = {name: str(target_dir / "release" / name)
                         for name in ("ipevents", "discard", "loadgen", "microbench")}
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.loadgen = Loadgen(self.binaries["loadgen"], settings.seed, self.logs / "loadgen.log")
        self.notes = {}
        self.server_flags = ()
        self.paired_drains = False
        # `--calibrate`: step 1 with the discard receiver in the server's seat too.
        self.calibrating = False
        self.load_at_start = os.getloadavg()[0]

    def note(self, step, text):
        """Records something the report must say under `step`, and shows it now."""
        self.notes.setdefault(step, []).append(text)
        log(f"note: {text}")

    def receiver(self, kind, *flags, binary=None):
        """A receiver of `kind` with `flags`; `binary` replaces the release build's (another
        allocator's build of the server)."""
        binary = binary or self.binaries["ipevents" if kind == "ipevents" else "discard"]
        if kind == "ipevents":
            flags = (*flags, *self.server_flags)
        return Receiver(binary, kind, flags, self.logs / f"{kind}.log")

    def ipevents_with(self, feature):
        """The server built with the Cargo `feature` (an allocator) besides `tools`, in a
        target directory of its own under the bench's, built now unless `--no-build`; the
        release build for None; None when the build failed or there is no such binary."""
        if feature is None:
            return self.binaries["ipevents"]
        target_dir = self.target_dir / f"bench-{feature.removeprefix('alloc-')}"
        if self.may_build:
            try:
                build(target_dir, features=f"tools,{feature}", bins=("--bin", "ipevents"))
            except subprocess.CalledProcessError as error:
                # An older binary in that directory would not be this revision's.
                log(f"the build with {feature} failed ({error}); its figures are skipped")
                return None
        binary = target_dir / "release" / "ipevents"
        return str(binary) if os.access(binary, os.X_OK) else None

    def check_rcvbuf(self, step, receiver, requested):
        if receiver.rcvbuf_bytes < requested:
            self.note(step, f"{receiver.kind} got a {fmt.size(receiver.rcvbuf_bytes)} receive "
                            f"buffer, not the {fmt.size(requested)} asked: the kernel capped it "
                            "(run as root, or raise net.core.rmem_max)")


def write_report(bench, command, started, parts):
    """Writes report.md: the machine, the command, then the sections; returns the text."""
    settings = bench.settings
    if settings.quick:
        mode = (f"quick: small counts, {settings.runs} run(s) per figure; the figures only show "
                "that every step works")
    else:
        mode = f"full: every figure is the median [min–max] of {settings.runs} runs"
    head = [
        "# ipevents benchmark",
        "",
        fmt.machine(str(REPO), settings.cores, bench.load_at_start),
        "",
        f"Command: `{command}`  ",
        f"Mode: {mode}  ",
        f"Seed: {settings.seed}; took {(time.monotonic() - started) / 60:.1f} min; logs in "
        f"`{bench.logs}`.",
    ]
    text = "\n".join(head + [line for part in parts for line in ["", *part]]) + "\n"
    (bench.out / "report.md").write_text(text, encoding="utf-8")
    return text


# --- Main ----------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark ipevents against the discard receiver; writes OUT/report.md "
                    "and OUT/loss.svg.")
    parser.add_argument("--quick", action="store_true",
                        help="small counts and one run each, to check that every step works")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per figure (median, min, max) [default: 3; 1 with --quick]")
    parser.add_argument("--out", default="bench-out", help="output directory [bench-out]")
    parser.add_argument("--no-build", action="store_true", help="use the binaries as built")
    parser.add_argument("--target-dir", default=None,
                        help="cargo's target directory [$CARGO_TARGET_DIR or target/]")
    parser.add_argument("--seed", type=int, default=1, help="loadgen's seed [1]")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="an extra flag for every ipevents started, e.g. "
                             "--server-flag=--batch=256 (repeatable), for tuning runs")
    parser.add_argument("--paired-drains", action="store_true",
                        help="step 1 runs both receivers at once and alternates their drains, "
                             "instead of one receiver's drains and then the other's")
    parser.add_argument("--calibrate", action="store_true",
                        help="run step 1 only, with the discard receiver in the server's seat "
                             "too: each ratio is then the step's own error, 1.00 if it had "
                             "none")
    parser.add_argument("--capacity-only", action="store_true",
                        help="run step 1 (receiver capacity, then 1b and 1c) only")
    parser.add_argument("--profile-only", action="store_true",
                        help="run step 1c (the worker's user-space time, and the server's "
                             "time per datagram against discard's, from perf) only")
    parser.add_argument("--cluster-only", action="store_true",
                        help="run step 6 (cluster mode) only")
    parser.add_argument("--memory-only", type=int, default=None, metavar="RATE",
                        help="run step 4 (memory) only, writing at RATE datagrams/s with two "
                             "sender threads")
    parser.add_argument("--scale-only", action="store_true",
                        help="run step 7 (one node at full scale) only; builds the server "
                             "with each allocator feature")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.calibrate and args.server_flag:
        parser.error("--calibrate runs no server, so --server-flag has nothing to apply to")
    return args


def build(target_dir, features="tools", bins=("--bins",)):
    argv = ["cargo", "build", "--release", "--features", features, *bins]
    log(f"building: {' '.join(argv)} (target dir {target_dir})")
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    subprocess.run(argv, cwd=REPO, env=env, check=True)


@dataclass
class Results:
    """What the seven steps measured, and what they measured it at."""

    capacity: dict
    micro: tuple
    profile: dict
    searches: dict
    server_rate: float
    threads: int
    plotter: str
    queries: list
    memory: list
    reference: list
    cluster: dict
    scale: dict


def run_steps(bench):
    log("step 1/7: receiver capacity")
    capacity = steps.step_capacity(bench)
    micro = steps.step_micro(bench)
    profile = perf_profile.step_profile(bench)
    log("step 2/7: lossless paced rate")
    searches = steps.step_lossless(bench)
    plotter = write_loss_plot(
        bench.out / "loss.svg",
        {kind: [[(t.offered_per_s, t.loss_percent) for t in search.trials]
                for search in searches[kind]]
         for kind in RECEIVERS},
        log)
    # Steps 3 and 4 write at the server's lossless rate, with as many sender threads as the
    # search needed to reach it.
    server_rate = fmt.Figure([search.best()[0] for search in searches["ipevents"]]).median
    if not server_rate:
        server_rate = SEARCH_START_PER_S
        bench.note("queries", "no lossless rate was found for the server; steps 3 and 4 use "
                              f"{fmt.rate(server_rate)}/s")
    threads = max(search.threads() for search in searches["ipevents"])
    log("step 3/7: query latency")
    queries = steps.step_queries(bench, server_rate, threads)
    log("step 4/7: memory")
    memory = steps.step_memory(bench, server_rate, threads)
    log("step 5/7: reference scenario at 33,000 datagrams/s")
    reference = steps.step_reference(bench)
    log("step 6/7: cluster mode")
    clustered = cluster.step_cluster(bench)
    log("step 7/7: one node at full scale")
    scaled = scale.step_scale(bench, memory=(memory, server_rate))
    return Results(capacity, micro, profile, searches, server_rate, threads, plotter, queries,
                   memory, reference, clustered, scaled)


def report_sections(bench, results):
    return [
        sections.capacity_section(bench, results.capacity) + sections.notes(bench, "capacity"),
        sections.micro_section(bench, results.micro),
        perf_profile.profile_section(bench, results.profile) + sections.notes(bench, "profile"),
        sections.lossless_section(bench, results.searches, results.plotter),
        sections.queries_section(bench, results.queries, results.server_rate, results.threads)
        + sections.notes(bench, "queries"),
        sections.memory_section(bench, results.memory, results.server_rate)
        + sections.notes(bench, "memory"),
        sections.reference_section(bench, results.reference),
        cluster.cluster_section(bench, results.cluster) + sections.notes(bench, "cluster"),
        scale.scale_section(bench, results.scale) + sections.notes(bench, "scale"),
        sections.observations(bench, results.capacity, results.searches, results.queries,
                              results.memory, results.reference),
    ]


def capacity_part(bench):
    """Step 1, measured now, as its report section with its notes."""
    capacity = steps.step_capacity(bench)
    return sections.capacity_section(bench, capacity) + sections.notes(bench, "capacity")


def main(argv):
    args = parse_args(argv)
    started = time.monotonic()
    command = "python3 " + " ".join(shlex.quote(arg) for arg in [sys.argv[0], *argv])
    target_dir = Path(args.target_dir or os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    target_dir = target_dir.resolve()
    if not args.no_build:
        build(target_dir)
    settings = Settings.of(args)
    bench = Bench(settings, target_dir, Path(args.out).resolve(), may_build=not args.no_build)
    for name, binary in bench.binaries.items():
        if not os.access(binary, os.X_OK):
            raise BenchError(f"no {name} binary at {binary}: build it, or drop --no-build")
    bench.server_flags = tuple(args.server_flag)
    bench.paired_drains = args.paired_drains
    bench.calibrating = args.calibrate
    log(f"{settings.cores} cores, {settings.runs} run(s) per figure, output in {bench.out}")
    if args.memory_only:
        memory = steps.step_memory(bench, args.memory_only, 2)
        section = (sections.memory_section(bench, memory, args.memory_only)
                   + sections.notes(bench, "memory"))
        text = write_report(bench, command, started, [section])
    elif args.scale_only:
        # Its bytes per pair are step 4's measurement, which leaves its notes under "memory".
        section = (scale.scale_section(bench, scale.step_scale(bench))
                   + sections.notes(bench, "scale") + sections.notes(bench, "memory"))
        text = write_report(bench, command, started, [section])
    elif args.cluster_only:
        section = cluster.cluster_section(bench, cluster.step_cluster(bench))
        text = write_report(bench, command, started, [section + sections.notes(bench, "cluster")])
    elif args.calibrate:
        text = write_report(bench, command, started, [capacity_part(bench)])
    elif args.capacity_only:
        section = capacity_part(bench)
        micro = sections.micro_section(bench, steps.step_micro(bench))
        profiled = (perf_profile.profile_section(bench, perf_profile.step_profile(bench))
                    + sections.notes(bench, "profile"))
        text = write_report(bench, command, started, [section, micro, profiled])
    elif args.profile_only:
        profiled = (perf_profile.profile_section(bench, perf_profile.step_profile(bench))
                    + sections.notes(bench, "profile"))
        text = write_report(bench, command, started, [profiled])
    else:
        results = run_steps(bench)
        text = write_report(bench, command, started, report_sections(bench, results))
    print(text, end="")


if __name__ == "__main__":
    # SIGTERM ends the benchmark like Ctrl-C does, so that every receiver it started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main(sys.argv[1:])
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        stop_all()
