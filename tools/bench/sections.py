"""The report's sections: one Markdown section per step, and the observations drawn from the
numbers. Nothing here measures; it only reads what the steps returned.
"""

import report as fmt
from plot import THRESHOLD_PERCENT
from steps import (
    BAD_IPS,
    DRAIN_POLL_MAX_S,
    DRAIN_POLL_S,
    GOOD_IPS,
    MEMORY_RCVBUF_BYTES,
    MICRO_ROWS,
    RECEIVERS,
    SEARCH_BISECTIONS,
    SEARCH_START_PER_S,
    SENDER_LIMIT_SHARE,
    STEERING_MODES,
    capacity_configs,
)


def capacity_section(bench, results):
    cores = bench.settings.cores
    rows = []
    for workers, steering in capacity_configs(cores):
        server = results[("ipevents", workers, steering)]
        discard = results[("discard", workers, steering)]
        server_rate = fmt.Figure([d.events_per_s for d in server])
        discard_rate = fmt.Figure([d.events_per_s for d in discard])
        ratio = (server_rate.median / discard_rate.median
                 if server_rate and discard_rate else None)
        rows.append([
            workers,
            "— (one socket)" if workers == 1 else steering,
            f"{min(d.count for d in server + discard):,}",
            server_rate.show(fmt.rate),
            discard_rate.show(fmt.rate),
            fmt.ratio(ratio) if ratio else "n/a",
            fmt.Figure([d.busiest_share * 100 for d in server]).show(fmt.percent),
            fmt.Figure([d.busiest_share * 100 for d in discard]).show(fmt.percent),
            sum(d.drops for d in server + discard),
            fmt.rate(fmt.Figure([d.sent_per_s for d in server + discard]).median),
        ])
    truesize = [d.queued_bytes / d.count for key, drains in results.items() if key[1] == 1
                for d in drains if d.count and not d.drops]
    text = [
        "## 1. Receiver capacity",
        "",
        "The receiver is stopped (SIGSTOP), `loadgen --send-only --rate 0 --sockets 64` queues "
        "N datagrams of the reference mix in its sockets (receive buffers of 1 GiB, the most "
        "Linux grants), and events/s is N over the time from SIGCONT until `/metrics` counts "
        f"all N (polled at most every {DRAIN_POLL_MAX_S * 1000:.0f} ms, and every "
        f"{DRAIN_POLL_S * 1000:.0f} ms near the end). No sender competes for the CPU "
        "while the receiver drains. loadgen runs on the first CPU, where each receiver's "
        "first worker runs: on loopback a datagram's buffer is allocated on the sending CPU, "
        "and where it is freed changes a drain's rate more than either receiver does. The "
        "last column is how fast loadgen queued the datagrams "
        "into the stopped receiver: the kernel's send path alone. The `adaptive` row (the "
        "server's default) first drains once unrecorded, for both receivers, so that the server has found the "
        "reference mix's hot apps before the measured datagrams are queued; `discard` has no "
        "balancer, so its `adaptive` row runs `random`, which is what adaptive steering makes "
        "of those three hot apps.",
        "",
        *(["With `--paired-drains`, both receivers of a row run at once, one idle while "
           "the other is filled and drained; their drains alternate (server, discard, then "
           "discard, server, ...).", ""]
          if bench.paired_drains else []),
        *(["**Calibration** (`--calibrate`): the discard receiver runs in the server's seat "
           "too, so the `ipevents` columns are a second discard receiver's, and each ratio "
           "is the step's own error: 1.00 if it had none.", ""]
          if bench.calibrating else []),
        fmt.table(["workers", "steering", "N", "ipevents events/s", "discard events/s",
                   "ipevents/discard", "busiest worker (ipevents)", "busiest worker (discard)",
                   "kernel drops", "loadgen queued at"], rows),
    ]
    if truesize:
        text += ["", f"The kernel charged {fmt.Figure(truesize).median:.0f} bytes of receive "
                     "buffer per queued datagram (its truesize, read from /proc/net/udp)."]
    return text


def micro_section(bench, micro):
    figures, ips = micro
    rows = [[what, fmt.Figure(figures[name]).show(lambda ns: f"{ns:.1f}")]
            for name, what in MICRO_ROWS]
    return [
        "## 1b. The worker's own cost per datagram",
        "",
        "`microbench`, without the kernel: `worker::apply_batch` (a batch of 64 parsed and "
        "applied in order, each event at once while its app is in the key cache, the rest of "
        "the batch after the loop from the first one that is not) over datagrams encoded as loadgen encodes them, on a table warmed by one "
        f"pass; the reference mix (3 apps, {ips} IPs each) and {bench.settings.query_apps:,} "
        "apps of 16 IPs, each datagram naming a uniformly drawn (app, ip); then the parts "
        "alone. Each run is the median of five passes.",
        "",
        fmt.table(["what", "ns per datagram, key or sha"], rows),
    ]


def lossless_section(bench, searches, plotter):
    rows = []
    for kind in RECEIVERS:
        best = [search.best() for search in searches[kind]]
        limited = any(flag for _, flag in best)
        rows.append([
            kind,
            fmt.Figure([rate for rate, _ in best]).show(fmt.rate),
            max(search.threads() for search in searches[kind]),
            "yes" if limited else "no",
            sum(len(search.trials) for search in searches[kind]),
        ])
    trial_rows = [[t.receiver, t.run + 1, fmt.rate(t.offered_per_s), fmt.rate(t.achieved_per_s),
                   f"{t.loss_percent:.4f}%", t.threads, "yes" if t.sender_limited else ""]
                  for kind in RECEIVERS for search in searches[kind] for t in search.trials]
    settings = bench.settings
    return [
        "## 2. Lossless paced rate",
        "",
        f"The highest `--rate` at which at least {100 - THRESHOLD_PERCENT}% of "
        f"{settings.search_count:,} datagrams arrive (a trial stops after "
        f"{settings.search_max_s:.0f} s at low rates), with one worker per core and the default "
        f"steering (adaptive). The search doubles from {fmt.rate(SEARCH_START_PER_S)}/s until a "
        f"trial loses, then bisects {SEARCH_BISECTIONS} times. A trial whose sender reached "
        f"less than {SENDER_LIMIT_SHARE:.0%} of the offered rate is sender-limited; a second "
        "sender thread is then tried. The server's answers are verified on every trial.",
        "",
        fmt.table(["receiver", "lossless rate (datagrams/s)", "sender threads",
                   "sender-limited", "trials"], rows),
        "",
        f"![loss against offered rate](loss.svg) (drawn with {plotter})",
        "",
        "<details><summary>Every trial</summary>",
        "",
        fmt.table(["receiver", "run", "offered/s", "achieved/s", "loss", "threads",
                   "sender-limited"], trial_rows),
        "",
        "</details>",
    ]


def queries_section(bench, results, lossless_per_s, threads):
    settings = bench.settings
    queries = [result["queries"] for result in results]

    def figure(key):
        return fmt.Figure([q[key] for q in queries]).show(fmt.ms)

    loss = fmt.Figure([r["probed"]["lost_percent"] for r in results]).show(fmt.percent)
    rows = [[f"{settings.query_apps:,}", f"{fmt.rate(lossless_per_s / 2)}/s",
             fmt.Figure([q["count"] for q in queries]).show(fmt.count),
             figure("p50_ms"), figure("p99_ms"), figure("max_ms"),
             sum(q["errors"] for q in queries), loss]]
    return [
        "## 3. Query latency under load",
        "",
        f"{settings.query_apps:,} apps are loaded with {settings.query_load_count:,} datagrams "
        f"at {fmt.rate(lossless_per_s)}/s (the server's lossless rate, {threads} sender "
        "thread(s)); then, while the same apps are written at half that rate for "
        f"{settings.query_duration_s:g} s, a second thread asks for a random one "
        "(`GET /events/{sha}`, keep-alive) every 2 ms. A query goes to every worker, and each "
        "reads its socket empty before it answers.",
        "",
        fmt.table(["apps", "write rate", "queries", "p50", "p99", "max", "failed",
                   "datagram loss"], rows),
    ]


def memory_section(bench, results, lossless_per_s):
    settings = bench.settings

    def figure(key, unit):
        return fmt.Figure([r[key] for r in results]).show(unit)

    rows = [[f"{settings.memory_apps:,}", figure("stored", fmt.count),
             figure("entries", fmt.count), figure("before", fmt.size),
             figure("after", fmt.size), figure("per_pair", lambda v: f"{v:.1f} B"),
             figure("per_app", lambda v: f"{v:.0f} B"),
             figure("reset_s", lambda v: fmt.ms(v * 1000)), figure("after_reset", fmt.size)]]
    return [
        "## 4. Memory",
        "",
        f"A server with one worker per core and `--max-apps 2000000` receives every (app, ip) "
        f"pair of {settings.memory_apps:,} apps with {GOOD_IPS} good and {BAD_IPS} bad IPs "
        f"exactly once (`--each-pair-once`, at {fmt.rate(lossless_per_s)}/s; receive buffers "
        f"of {fmt.size(MEMORY_RCVBUF_BYTES)}, which are kernel memory and not in the RSS, so "
        "that the pauses of growing tables lose nothing). Bytes per pair = RSS growth / pairs "
        "stored; an app's pairs are spread over the workers, each of which holds an entry for "
        "it (the entries column), so the figures include the per-app entries.",
        "",
        fmt.table(["apps", "pairs stored", "app entries", "RSS before", "RSS after",
                   "per pair", "per app", "DELETE /events", "RSS after reset"], rows),
    ]


def reference_section(bench, results):
    settings = bench.settings
    summaries = [r["summary"] for r in results]
    rows = [[f"{settings.reference_duration_s:g} s",
             fmt.Figure([s["sent"] for s in summaries]).show(fmt.count),
             fmt.Figure([s["lost"] for s in summaries]).show(fmt.count),
             fmt.Figure([r["cpu_percent"] for r in results]).show(fmt.percent)]]
    return [
        "## 5. The reference scenario at the load test's scale",
        "",
        "`loadgen --scenario reference --rate 33000` against a server with one worker per "
        "core. CPU is the server's user plus system time over the whole loadgen run "
        "(/proc/PID/stat), as a share of one core.",
        "",
        fmt.table(["duration", "sent", "lost", "server CPU"], rows),
    ]


def drained_rate(capacity, key):
    """The median events/s of one capacity row, or None."""
    return fmt.Figure([d.events_per_s for d in capacity[key]]).median


def capacity_observations(cores, capacity):
    said = []
    if cores > 1:
        for kind in RECEIVERS:
            rates = {mode: drained_rate(capacity, (kind, cores, mode)) for mode in STEERING_MODES}
            known = {mode: rate for mode, rate in rates.items() if rate}
            one = drained_rate(capacity, (kind, 1, "hash"))
            if known:
                fastest = max(known, key=known.get)
                listed = ", ".join(f"{mode} {fmt.rate(rate)}/s" for mode, rate in known.items())
                said.append(f"With {cores} workers, the fastest steering for {kind} is "
                            f"`{fastest}` ({listed}).")
            if known and one:
                said.append(f"{kind}: {cores} workers drain {max(known.values()) / one:.2f}× "
                            "as fast as one.")
        share = fmt.Figure([d.busiest_share for d in capacity[("ipevents", cores, "cpu")]])
        if share and share.median > 0.9:
            said.append(f"`cpu` steering put {share.median:.0%} of the datagrams on one "
                        "worker: on loopback the receiving CPU is the sending CPU, and one "
                        "sender thread queued them all.")
        elif share:
            said.append(f"`cpu` steering put {share.median:.0%} of the datagrams on the "
                        "busiest worker: the one sender thread moved between CPUs while it "
                        "sent, and on loopback the receiving CPU is the sending CPU.")
    ratios = []
    for workers, steering in capacity_configs(cores):
        server = drained_rate(capacity, ("ipevents", workers, steering))
        discard = drained_rate(capacity, ("discard", workers, steering))
        if server and discard:
            ratios.append(server / discard)
    if ratios:
        said.append(f"The server drains at {min(ratios):.2f} to {max(ratios):.2f} times the "
                    "rate of the discard receiver, which only reads and counts.")
    return said


def lossless_observations(cores, capacity, searches):
    said = []
    for kind in RECEIVERS:
        best = [search.best() for search in searches[kind]]
        rate = fmt.Figure([rate for rate, _ in best]).median
        threads = max(search.threads() for search in searches[kind])
        drained = max((drained_rate(capacity, (kind, workers, mode)) or 0
                       for workers, mode in capacity_configs(cores)), default=0)
        if any(limited for _, limited in best):
            said.append(f"The lossless search for {kind} was sender-limited: it took "
                        f"everything loadgen could send with {threads} thread(s) "
                        f"({fmt.rate(rate)}/s, lossless), so its limit is higher; it drained "
                        f"up to {fmt.rate(drained)}/s in step 1. On loopback the sender pays "
                        "for the kernel's whole delivery path, so a paced sender on the same "
                        "cores runs out of CPU before the receiver does.")
        elif rate and drained:
            said.append(f"{kind} stays lossless up to {fmt.rate(rate)}/s paced, "
                        f"{rate / drained:.0%} of the {fmt.rate(drained)}/s it drains from a "
                        "full queue in step 1.")
    return said


def cost_observations(queries, memory, reference):
    said = []
    if queries:
        p99 = fmt.Figure([q["queries"]["p99_ms"] for q in queries]).median
        said.append(f"Queries answer in {p99:.3g} ms at p99 while the apps are being written.")
    if memory:
        per_pair = fmt.Figure([m["per_pair"] for m in memory]).median
        freed = fmt.Figure([m["after"] - m["after_reset"] for m in memory]).median
        grown = fmt.Figure([m["after"] - m["before"] for m in memory]).median
        said.append(f"A stored (app, ip) pair costs {per_pair:.0f} bytes of RSS, per-app "
                    f"entries included; `DELETE /events` gave back "
                    f"{freed / max(grown, 1):.0%} of the growth to the OS.")
    if reference:
        lost = sum(r["summary"]["lost"] for r in reference)
        cpu = fmt.Figure([r["cpu_percent"] for r in reference]).median
        said.append(f"At the load test's 33,000 datagrams/s the server lost {lost} datagrams "
                    f"in all and used {cpu:.1f}% of one core.")
    return said


def observations(bench, capacity, searches, queries, memory, reference):
    """Short sentences drawn from the numbers, for the reader in a hurry."""
    cores = bench.settings.cores
    said = (capacity_observations(cores, capacity)
            + lossless_observations(cores, capacity, searches)
            + cost_observations(queries, memory, reference))
    if bench.load_at_start > max(0.5, 0.25 * cores):
        said.append(f"The machine was busy before the benchmark started (load average "
                    f"{bench.load_at_start:.1f} on {cores} cores): the figures understate what "
                    "a quiet machine does.")
    return ["## Observations", ""] + [f"- {sentence}" for sentence in said]


def notes(bench, step):
    """What a step noted on the way (capped buffers, drops, loss), under its section."""
    lines = []
    for text in bench.notes.get(step, []):
        lines += ["", f"> **Note:** {text}"]
    return lines
