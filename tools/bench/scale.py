"""Step 7, one node at full scale: what a single server does with hundreds of thousands to
millions of apps, each measurement against the goal it is meant to meet.

- memory against workers: RSS growth with 1 worker and with 4, for the same apps;
- balance: capacity with the default steering against `random`, from one sender socket;
- growth pauses: the longest batch while millions of new apps arrive, and the kernel's drops;
- reset and memory given back, for each allocator the server can be built with, with the RSS
  of the loaded table and the capacity of that build;
- bytes per (app, ip) pair with a million apps of 16 IPs, default steering and `random`;
- snapshot memory: the RSS rise while the state file is written.

Each measurement returns plain dicts (one per run); `scale_section` writes the report. Every
receiver is started in a `with` block, every loadgen run is bounded by count and time, and all
traffic goes to loopback.
"""

import os
import tempfile
import time

import report as fmt
from receiver import parse_quantiles, parse_report_row, samples
from steps import (
    BAD_IPS,
    CAPACITY_RCVBUF_BYTES,
    GOOD_IPS,
    LOADGEN_MAX_S,
    MEMORY_RCVBUF_BYTES,
    log,
    measure_drain,
    step_memory,
    timed_reset_or_note,
    wait_for_hot_apps,
)

# Workers of the node under test where the measurement does not vary them: the machine the
# goals were set for has 2 cores.
SCALE_WORKERS = 2

# The paced rate the loads are sent at: one the server takes without loss on 2 cores (the
# kernel's drops are reported with every load to show it).
LOAD_RATE_PER_S = 150_000

# Source sockets of the loads, so that the flow hash has several flows to spread.
LOAD_SOCKETS = 16

# Memory against workers: each pair is sent this many times, and the goal for the RSS growth
# of 4 workers over that of 1.
PAIR_TIMES = 3
WORKERS_RATIO_GOAL = 1.15
WORKER_CONFIGS = (
    ("1 worker", ("--workers", 1)),
    ("4 workers, default steering", ("--workers", 4, "--no-pin")),
    ("4 workers, random", ("--workers", 4, "--no-pin", "--steering", "random")),
)

# Balance: the warm-up before the server is stopped (queued datagrams are steered by the
# kernel when they are queued, so whatever the steering learns from traffic must have been
# learnt by then), and the goal for default over random.
WARM_UP_RATE_PER_S = 50_000
WARM_UP_S = 3
BALANCE_GOAL = 0.9

# Growth pauses: new apps, one datagram each, at this rate from this many sender threads (one
# falls short of it on 2 busy cores); the goal for the longest batch.
GROWTH_RATE_PER_S = 250_000
GROWTH_THREADS = 2
BATCH_GOAL_S = 0.020

# Reset: the apps' shape, when the RSS is sampled after `DELETE /events`, and the goals.
RESET_GOOD_IPS, RESET_BAD_IPS = 2, 2
RSS_AFTER_RESET_S = (0.5, 1, 2, 3)
RESET_GOAL_S = 0.030
GIVEN_BACK_GOAL = 0.70

# The allocators the server can be built with: (name, Cargo feature or None for glibc's).
ALLOCATORS = (("glibc", None), ("mimalloc", "alloc-mimalloc"), ("jemalloc", "alloc-jemalloc"))

# Bytes per pair at 1M apps x 16 IPs: the goal.
PAIR_BYTES_GOAL = 20

# Snapshot: how often the RSS is sampled, how long the snapshot may take, the goal for the
# peak rise, and a periodic interval long enough never to fire during the step.
SNAPSHOT_POLL_S = 0.010
SNAPSHOT_DEADLINE_S = 120
SNAPSHOT_RISE_GOAL = 0.10
SNAPSHOT_INTERVAL_S = 86_400

# The server's cap on distinct apps, above every load here.
MAX_APPS = 4_000_000


# --- Pure helpers --------------------------------------------------------------------------


def ratio_of(numerator, denominator):
    """numerator / denominator, or None when either is missing or the denominator is not
    positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def share_given_back(before, after_load, later):
    """The share of the apps' memory (`after_load - before`) returned to the OS by `later`;
    None when the load grew nothing."""
    return ratio_of(after_load - later, after_load - before)


def peak_rise_share(before, rss_samples):
    """How far above `before` the highest sample went, as a share of `before`."""
    if not rss_samples:
        return None
    return ratio_of(max(rss_samples) - before, before)


def longest_batch_s(report_row, quantiles):
    """The longest batch: the max of the shutdown report's row when there is one, else the
    highest quantile /metrics gave (a lower bound)."""
    if report_row is not None:
        return report_row["max"], "max (shutdown report)"
    if quantiles:
        top = max(quantiles)
        return quantiles[top], f"p{top * 100:g} (/metrics; no max there)"
    return None, "n/a"


def verdict(value, goal, at_most=True):
    """Whether a figure meets its goal: `yes`, `no`, or `n/a` when it was not measured."""
    if value is None:
        return "n/a"
    return "yes" if (value <= goal if at_most else value >= goal) else "no"


def median_of(runs, key):
    return fmt.Figure([run.get(key) for run in runs]).median


# --- Loads ---------------------------------------------------------------------------------


def load_pairs(bench, server, apps, good_ips, bad_ips, times, rate_per_s, threads=1):
    """Sends every (app, ip) pair of a many-apps world `times` times at `rate_per_s` from
    `LOAD_SOCKETS` sockets and `threads` threads; returns the RSS before and after, and what
    the server counted."""
    pairs = apps * (good_ips + bad_ips)
    datagrams = pairs * times
    send_s = datagrams / rate_per_s
    # The count bounds the run; the duration only guards against a sender that falls behind.
    duration_s = min(LOADGEN_MAX_S, 3 * send_s + 10)
    base = server.metrics()
    before = server.rss_bytes()
    summary = bench.loadgen.run(
        server, "--scenario", "many-apps", "--apps", apps, "--good-ips", good_ips,
        "--bad-ips", bad_ips, "--each-pair-times", times, "--rate", rate_per_s,
        "--sockets", LOAD_SOCKETS, "--threads", threads, "--duration", f"{duration_s:.0f}",
        bound_s=duration_s)
    after = server.rss_bytes()
    counters = server.metrics().since(base)
    return dict(apps=apps, pairs=pairs, datagrams=datagrams, sent=summary["sent"],
                lost=summary["lost"], drops=counters.kernel_drops,
                sent_per_s=summary["send_rate_per_s"], entries=counters.app_entries,
                before=before, after=after, grown=after - before,
                per_pair=(after - before) / pairs, steering=server.steering,
                rcvbuf=server.rcvbuf_bytes)


def note_loss(bench, what, load):
    if load["lost"] or load["drops"]:
        bench.note("scale", f"{what}: {load['lost']} of {load['sent']} datagrams lost, "
                            f"{load['drops']} kernel drops; the memory figures count the "
                            "pairs sent")


# --- 1. Memory against workers -------------------------------------------------------------


def memory_against_workers(bench):
    apps = bench.settings.scale_workers_apps
    results = {label: [] for label, _ in WORKER_CONFIGS}
    for _ in range(bench.settings.runs):
        for label, flags in WORKER_CONFIGS:
            with bench.receiver("ipevents", *flags, "--max-apps", MAX_APPS,
                                "--rcvbuf", MEMORY_RCVBUF_BYTES) as server:
                load = load_pairs(bench, server, apps, GOOD_IPS, BAD_IPS, PAIR_TIMES,
                                  LOAD_RATE_PER_S)
            note_loss(bench, f"memory against workers, {label}", load)
            results[label].append(load)
            log(f"scale: {label}: RSS grew {fmt.size(load['grown'])} "
                f"({load['per_pair']:.1f} B/pair), {load['drops']} kernel drops")
    return results


# --- 2. Balance ----------------------------------------------------------------------------


def warm_drain(bench, server):
    """The reference mix from one socket at a moderate rate (loadgen resets the server
    first), then one drain from one socket, without a reset in between."""
    bench.loadgen.run(server, "--scenario", "reference", "--sockets", 1,
                      "--rate", WARM_UP_RATE_PER_S, "--duration", WARM_UP_S, "--no-verify",
                      bound_s=WARM_UP_S)
    if server.steering == "adaptive" and not wait_for_hot_apps(server):
        bench.note("scale", "adaptive steering found no hot app after the warm-up")
    return measure_drain(bench, server, bench.settings.capacity_count, sockets=1, reset=False)


def balance_order(run_index):
    """The modes of one balance run, in the order measured: they alternate from run to run,
    so that neither always goes first on a machine whose load drifts."""
    modes = (("default", ()), ("random", ("--steering", "random")))
    return modes if run_index % 2 == 0 else modes[::-1]


def balance(bench):
    runs = []
    for run_index in range(bench.settings.runs):
        run = {}
        for mode, flags in balance_order(run_index):
            with bench.receiver("ipevents", "--workers", SCALE_WORKERS,
                                "--rcvbuf", CAPACITY_RCVBUF_BYTES, *flags) as server:
                bench.check_rcvbuf("scale", server, CAPACITY_RCVBUF_BYTES)
                drain = warm_drain(bench, server)
            run[mode] = drain
            run[f"{mode}_steering"] = server.steering
        run["ratio"] = ratio_of(run["default"].events_per_s, run["random"].events_per_s)
        runs.append(run)
        shown = fmt.ratio(run["ratio"]) if run["ratio"] else "n/a"
        log(f"scale: balance, default {run['default_steering']} over random: {shown}")
    return runs


# --- 3. Growth pauses ----------------------------------------------------------------------


def growth_pauses(bench):
    apps = bench.settings.scale_growth_apps
    runs = []
    for _ in range(bench.settings.runs):
        with bench.receiver("ipevents", "--workers", SCALE_WORKERS,
                            "--max-apps", MAX_APPS) as server:
            load = load_pairs(bench, server, apps, 1, 0, 1, GROWTH_RATE_PER_S,
                              threads=GROWTH_THREADS)
            quantiles = parse_quantiles(server.get("/metrics"), "ipevents_batch_seconds")
        row = parse_report_row(server.output(), "batch")
        longest_s, source = longest_batch_s(row, quantiles)
        load.update(longest_batch_s=longest_s, longest_source=source,
                    p999_s=row["p99.9"] if row else quantiles.get(0.999),
                    batches=row["count"] if row else None)
        runs.append(load)
        shown = fmt.ms(longest_s * 1000) if longest_s is not None else "n/a"
        log(f"scale: {apps} new apps at {fmt.rate(GROWTH_RATE_PER_S)}/s: longest batch "
            f"{shown}, {load['drops']} kernel drops, {load['lost']} lost")
    return runs


# --- 4. Reset and memory given back, per allocator ----------------------------------------


def reset_run(bench, binary):
    apps = bench.settings.scale_reset_apps
    with bench.receiver("ipevents", "--workers", SCALE_WORKERS, "--max-apps", MAX_APPS,
                        "--rcvbuf", CAPACITY_RCVBUF_BYTES, binary=binary) as server:
        load = load_pairs(bench, server, apps, RESET_GOOD_IPS, RESET_BAD_IPS, 1,
                          LOAD_RATE_PER_S)
        reset_s = timed_reset_or_note(bench, "scale", server)
        reset_done = time.monotonic()
        later = {}
        for offset_s in RSS_AFTER_RESET_S:
            time.sleep(max(0.0, reset_done + offset_s - time.monotonic()))
            later[offset_s] = server.rss_bytes()
        drain = measure_drain(bench, server, bench.settings.capacity_count)
    last = later[RSS_AFTER_RESET_S[-1]]
    load.update(reset_s=reset_s, rss_after_reset=later,
                given_back=share_given_back(load["before"], load["after"], last),
                capacity_per_s=drain.events_per_s, capacity_count=drain.count)
    return load


def reset_and_given_back(bench):
    results = {}
    for name, feature in ALLOCATORS:
        binary = bench.ipevents_with(feature)
        if binary is None:
            bench.note("scale", f"no {name} build of the server (Cargo feature {feature}): "
                                "its row is empty")
            results[name] = []
            continue
        runs = []
        for _ in range(bench.settings.runs):
            run = reset_run(bench, binary)
            note_loss(bench, f"reset, {name}", run)
            runs.append(run)
            given = run["given_back"]
            reset = "n/a" if run["reset_s"] is None else f"{run['reset_s'] * 1000:.1f} ms"
            log(f"scale: {name}: DELETE /events {reset}, "
                f"{'n/a' if given is None else fmt.percent(given * 100)} given back at "
                f"{RSS_AFTER_RESET_S[-1]} s, {run['per_pair']:.1f} B/pair")
        results[name] = runs
    return results


# --- 5. Bytes per pair at 1M apps x 16 IPs -------------------------------------------------


def pair_bytes(bench, default=None):
    """Step 4's measurement with the default steering and with `random`; `default` is step
    4's own result when the full benchmark already measured it, as (runs, rate)."""
    if default is None:
        default = (step_memory(bench, LOAD_RATE_PER_S, 1), LOAD_RATE_PER_S)
    random_runs = step_memory(bench, LOAD_RATE_PER_S, 1, steering="random")
    return {"default": default, "random": (random_runs, LOAD_RATE_PER_S)}


# --- 6. Snapshot memory --------------------------------------------------------------------


def snapshot_run(bench, state_path):
    apps = bench.settings.scale_reset_apps
    with bench.receiver("ipevents", "--workers", SCALE_WORKERS, "--max-apps", MAX_APPS,
                        "--rcvbuf", MEMORY_RCVBUF_BYTES, "--state", state_path,
                        "--snapshot-interval", SNAPSHOT_INTERVAL_S) as server:
        load = load_pairs(bench, server, apps, RESET_GOOD_IPS, RESET_BAD_IPS, 1,
                          LOAD_RATE_PER_S)
        before = server.rss_bytes()
        taken = samples(server.get("/metrics")).get("ipevents_snapshots_total", 0)
        started = time.monotonic()
        server.request_snapshot()
        rss, done, totals = [], False, {}
        while time.monotonic() - started < SNAPSHOT_DEADLINE_S:
            rss.append(server.rss_bytes())
            totals = samples(server.get("/metrics"))
            if totals.get("ipevents_snapshots_total", 0) > taken:
                done = True
                break
            time.sleep(SNAPSHOT_POLL_S)
        wall_s = time.monotonic() - started
        file_bytes = os.path.getsize(state_path) if os.path.exists(state_path) else None
    if not done:
        bench.note("scale", f"the snapshot did not complete within {SNAPSHOT_DEADLINE_S} s")
    load.update(rss_before_snapshot=before, rss_peak=max(rss), rss_samples=len(rss),
                rise=peak_rise_share(before, rss), completed=done, wall_s=wall_s,
                snapshot_s=totals.get("ipevents_snapshot_last_seconds") if done else None,
                file_bytes=file_bytes)
    return load


def snapshot_memory(bench):
    runs = []
    for _ in range(bench.settings.runs):
        with tempfile.TemporaryDirectory(prefix="ipevents-bench-") as state_dir:
            run = snapshot_run(bench, os.path.join(state_dir, "state"))
        note_loss(bench, "snapshot", run)
        runs.append(run)
        rise = run["rise"]
        log(f"scale: snapshot of {run['apps']} apps: peak RSS rise "
            f"{'n/a' if rise is None else fmt.percent(rise * 100)}, "
            f"{run['snapshot_s'] or 0:.3f} s")
    return runs


def step_scale(bench, memory=None):
    """Every measurement of this step; `memory` is step 4's (runs, rate) when the full
    benchmark ran it, so that bytes per pair with the default steering is not measured
    twice."""
    log("scale: memory against workers")
    workers = memory_against_workers(bench)
    log("scale: balance")
    balanced = balance(bench)
    log("scale: growth pauses")
    growth = growth_pauses(bench)
    log("scale: reset and memory given back, per allocator")
    resets = reset_and_given_back(bench)
    log("scale: bytes per pair")
    pairs = pair_bytes(bench, memory)
    log("scale: snapshot memory")
    snapshot = snapshot_memory(bench)
    return dict(workers=workers, balance=balanced, growth=growth, resets=resets, pairs=pairs,
                snapshot=snapshot)


# --- The report ----------------------------------------------------------------------------


def figure(runs, key, unit):
    return fmt.Figure([run.get(key) for run in runs]).show(unit)


def per_s(value):
    return f"{fmt.rate(value)}/s"


def bytes_per_pair(value):
    return f"{value:.1f} B"


def share(value):
    return fmt.percent(value * 100)


def seconds_as_ms(value):
    """Milliseconds below a second, seconds above: `178 ms`, `4.82 s`."""
    return fmt.ms(value * 1000) if value < 1 else f"{value:.3g} s"


def printed_steering(runs):
    """The steering the server's start-up line named in these runs: `random`, or `?`."""
    return ", ".join(sorted({run.get("steering") or "?" for run in runs})) or "?"


def steering_label(runs, asked):
    """`default (random)`: what was asked and what the server said it used."""
    return f"{asked} ({printed_steering(runs)})"


def workers_table(bench, results):
    one = results[WORKER_CONFIGS[0][0]]
    one_grown = median_of(one, "grown")
    rows = []
    for label, flags in WORKER_CONFIGS:
        runs = results[label]
        ratio = ratio_of(median_of(runs, "grown"), one_grown)
        is_one = label == WORKER_CONFIGS[0][0]
        rows.append([
            label, "`" + " ".join(str(flag) for flag in flags) + "`", printed_steering(runs),
            figure(runs, "grown", fmt.size), figure(runs, "per_pair", bytes_per_pair),
            figure(runs, "entries", fmt.count),
            "1 (the base)" if is_one else (fmt.ratio(ratio) if ratio else "n/a"),
            "" if is_one else verdict(ratio, WORKERS_RATIO_GOAL),
            sum(run["drops"] for run in runs), sum(run["lost"] for run in runs),
            figure(runs, "sent_per_s", per_s),
        ])
    apps = bench.settings.scale_workers_apps
    return [
        "### 7.1 Memory against workers",
        "",
        f"{apps:,} apps with {GOOD_IPS} good and {BAD_IPS} bad IPs ({apps * 16:,} pairs), "
        f"every pair sent {PAIR_TIMES} times (`loadgen --each-pair-times {PAIR_TIMES}`, in "
        f"{PAIR_TIMES} passes) at {fmt.rate(LOAD_RATE_PER_S)}/s from {LOAD_SOCKETS} source "
        f"sockets, receive buffers of {fmt.size(MEMORY_RCVBUF_BYTES)} (kernel memory, not in "
        "the RSS). RSS growth = RSS after the load minus RSS before it. The steering column is "
        "what the server's start-up line said; the default is not passed. Goal: growth with 4 "
        f"workers at most {WORKERS_RATIO_GOAL} times that with 1.",
        "",
        fmt.table(["server", "flags", "steering", "RSS growth", "per pair", "app entries",
                   "growth / 1 worker's", f"≤ {WORKERS_RATIO_GOAL}", "kernel drops", "lost",
                   "sent at"], rows),
    ]


def balance_table(bench, runs):
    rows = []
    for mode in ("default", "random"):
        drains = [run[mode] for run in runs]
        rows.append([
            steering_label([{"steering": run[f"{mode}_steering"]} for run in runs], mode),
            fmt.Figure([d.events_per_s for d in drains]).show(fmt.rate),
            fmt.Figure([d.busiest_share * 100 for d in drains]).show(fmt.percent),
            sum(d.drops for d in drains), min(d.count for d in drains),
        ])
    ratio = fmt.Figure([run["ratio"] for run in runs])
    return [
        "### 7.2 Balance",
        "",
        f"The reference mix (3 apps) from one sender socket into {SCALE_WORKERS} workers: "
        "receiver capacity as in step 1 (N datagrams queued while the server is stopped, then "
        "drained), with the default steering and with `random`, both in the same run. Queued "
        "datagrams are steered by the kernel when they are queued, so before each drain the "
        f"server, in both modes alike, takes {WARM_UP_S} s of the same traffic at "
        f"{fmt.rate(WARM_UP_RATE_PER_S)}/s from the same one socket, and is not reset before "
        "the drain, so that a steering that learns from the traffic has learnt. Each mode has "
        "a server of its own; which goes first alternates from run to run. Goal: default "
        f"over random at least {BALANCE_GOAL}.",
        "",
        fmt.table(["steering", "events/s", "busiest worker", "kernel drops", "N"], rows),
        "",
        f"Default over random, per run (median): {ratio.show(fmt.ratio)}; at least "
        f"{BALANCE_GOAL}: {verdict(ratio.median, BALANCE_GOAL, at_most=False)}.",
    ]


def growth_table(bench, runs):
    longest = fmt.Figure([run["longest_batch_s"] for run in runs])
    drops = sum(run["drops"] for run in runs)
    sources = sorted({run["longest_source"] for run in runs})
    rcvbuf = sorted({run["rcvbuf"] for run in runs if run["rcvbuf"]})
    rows = [[f"{bench.settings.scale_growth_apps:,}", f"{fmt.rate(GROWTH_RATE_PER_S)}/s",
             figure(runs, "sent_per_s", per_s),
             ", ".join(fmt.size(value) for value in rcvbuf) or "?",
             longest.show(seconds_as_ms), figure(runs, "p999_s", seconds_as_ms),
             figure(runs, "batches", fmt.count), drops, sum(run["lost"] for run in runs),
             verdict(longest.median, BATCH_GOAL_S) if drops == 0 else "no (drops)"]]
    return [
        "### 7.3 Growth pauses",
        "",
        f"New apps, one datagram each (`--good-ips 1 --bad-ips 0 --each-pair-once`), at "
        f"{fmt.rate(GROWTH_RATE_PER_S)}/s from {LOAD_SOCKETS} sockets and {GROWTH_THREADS} "
        f"sender threads into {SCALE_WORKERS} "
        "workers with the server's default receive buffer. The longest batch is "
        f"{', '.join(sources)}: the time to receive and apply one `recvmmsg` batch; the kernel "
        "drops are the server's `ipevents_kernel_drops_total`. Goal: longest batch at most "
        f"{BATCH_GOAL_S * 1000:.0f} ms, no drop.",
        "",
        fmt.table(["new apps", "rate asked", "sent at", "receive buffer", "longest batch",
                   "p99.9 batch", "batches", "kernel drops", "lost",
                   f"≤ {BATCH_GOAL_S * 1000:.0f} ms, no drop"], rows),
    ]


def resets_table(bench, results):
    rows = []
    for name, _ in ALLOCATORS:
        runs = results[name]
        if not runs:
            rows.append([name] + ["n/a"] * 8)
            continue
        reset = fmt.Figure([run["reset_s"] for run in runs])
        given = fmt.Figure([run["given_back"] for run in runs])
        later = [fmt.Figure([run["rss_after_reset"][offset] for run in runs]).show(fmt.size)
                 for offset in RSS_AFTER_RESET_S]
        rows.append([
            name, figure(runs, "after", fmt.size), figure(runs, "per_pair", bytes_per_pair),
            reset.show(seconds_as_ms), verdict(reset.median, RESET_GOAL_S),
            " / ".join(later), given.show(share),
            verdict(given.median, GIVEN_BACK_GOAL, at_most=False),
            figure(runs, "capacity_per_s", fmt.rate),
        ])
    apps = bench.settings.scale_reset_apps
    ips = RESET_GOOD_IPS + RESET_BAD_IPS
    at = " / ".join(f"{offset:g} s" for offset in RSS_AFTER_RESET_S)
    return [
        "### 7.4 Reset and memory given back, per allocator",
        "",
        f"{apps:,} apps × {ips} IPs ({RESET_GOOD_IPS} good, {RESET_BAD_IPS} bad; "
        f"{apps * ips:,} pairs, each once) at {fmt.rate(LOAD_RATE_PER_S)}/s into "
        f"{SCALE_WORKERS} workers, then `DELETE /events` timed on a fresh connection, then the "
        f"RSS at {at} after it. Given back = (RSS after load − RSS {RSS_AFTER_RESET_S[-1]:g} s "
        "after reset) / (RSS after load − RSS before load). Per pair = RSS growth / pairs. "
        f"Capacity: one drain of {bench.settings.capacity_count:,} datagrams of the reference mix "
        "(as in step 1) on the same server after the reset. The allocator is chosen at build time (`--features tools,alloc-mimalloc`, "
        "each build in its own target directory). Goals: reset at most "
        f"{RESET_GOAL_S * 1000:.0f} ms, at least {GIVEN_BACK_GOAL:.0%} given back.",
        "",
        fmt.table(["allocator", "RSS after load", "per pair", "DELETE /events",
                   f"≤ {RESET_GOAL_S * 1000:.0f} ms", f"RSS at {at}",
                   f"given back at {RSS_AFTER_RESET_S[-1]:g} s",
                   f"≥ {GIVEN_BACK_GOAL:.0%}", "capacity (events/s)"], rows),
    ]


def pairs_table(bench, results):
    rows = []
    for mode in ("default", "random"):
        runs, rate_per_s = results[mode]
        per_pair = fmt.Figure([run["per_pair"] for run in runs])
        rows.append([
            steering_label(runs, mode), f"{fmt.rate(rate_per_s)}/s",
            figure(runs, "stored", fmt.count), figure(runs, "entries", fmt.count),
            figure(runs, "after", fmt.size), per_pair.show(bytes_per_pair),
            verdict(per_pair.median, PAIR_BYTES_GOAL),
            sum(run.get("drops") or 0 for run in runs),
        ])
    apps = bench.settings.memory_apps
    return [
        "### 7.5 Bytes per pair",
        "",
        f"Step 4's measurement ({apps:,} apps × {GOOD_IPS + BAD_IPS} IPs, every pair once, "
        f"{bench.settings.cores} workers) with the default steering and with `random`. Per pair "
        "= RSS growth / pairs stored, the apps' entries included. Goal: at most "
        f"{PAIR_BYTES_GOAL} bytes.",
        "",
        fmt.table(["steering", "rate asked", "pairs stored", "app entries", "RSS after",
                   "per pair", f"≤ {PAIR_BYTES_GOAL} B", "kernel drops"], rows),
    ]


def snapshot_table(bench, runs):
    rise = fmt.Figure([run["rise"] for run in runs])
    rows = [[f"{bench.settings.scale_reset_apps:,} × {RESET_GOOD_IPS + RESET_BAD_IPS}",
             figure(runs, "rss_before_snapshot", fmt.size), figure(runs, "rss_peak", fmt.size),
             rise.show(share), verdict(rise.median, SNAPSHOT_RISE_GOAL),
             figure(runs, "snapshot_s", seconds_as_ms), figure(runs, "wall_s", seconds_as_ms),
             figure(runs, "file_bytes", fmt.size), figure(runs, "rss_samples", fmt.count)]]
    return [
        "### 7.6 Snapshot memory",
        "",
        f"A server with `--state FILE` (in a temporary directory) and {SCALE_WORKERS} workers "
        "is loaded as in 7.4; SIGUSR1 asks it for a snapshot, and its RSS is sampled every "
        f"{SNAPSHOT_POLL_S * 1000:.0f} ms (each sample also reads `/metrics`) until "
        "`ipevents_snapshots_total` goes up. Rise = (peak RSS − RSS before) / RSS before. The "
        "snapshot time is the server's `ipevents_snapshot_last_seconds` (copy, merge, write); "
        "the wall time runs from the signal to the counter seen. Goal: rise at most "
        f"{SNAPSHOT_RISE_GOAL:.0%}.",
        "",
        fmt.table(["apps × IPs", "RSS before", "peak RSS", "rise", f"≤ {SNAPSHOT_RISE_GOAL:.0%}",
                   "snapshot time", "wall time", "state file", "RSS samples"], rows),
    ]


def scale_section(bench, results):
    return [
        "## 7. One node at full scale",
        "",
        f"Every figure is the median over runs [min–max], with what it was measured at. Loads "
        f"are paced (the rate asked and the rate loadgen reached are both given) and checked "
        "by loadgen's verification of a sample of apps.",
        "",
        *workers_table(bench, results["workers"]),
        "",
        *balance_table(bench, results["balance"]),
        "",
        *growth_table(bench, results["growth"]),
        "",
        *resets_table(bench, results["resets"]),
        "",
        *pairs_table(bench, results["pairs"]),
        "",
        *snapshot_table(bench, results["snapshot"]),
    ]
