"""Step 1c: the worker's own user-space time per datagram, from a perf profile of the real
server draining its socket (`bench.py --profile-only`, and part of the full run when `perf`
is installed).

One server with one worker. Each of DRAINS rounds stops it, queues DATAGRAMS reference
datagrams in its socket, resumes it and waits until the worker is idle again, while `perf
record` samples the worker thread alone. The figure is the share of samples outside the
kernel times the thread's CPU time (utime + stime from /proc), over the datagrams drained.

The rest of the machine is kept quiet, since on a virtual machine whose cores share a
physical one, work on the other core slows the worker's user-space code (README,
Performance):
- loadgen runs on the worker's own CPU, so that the kernel frees each datagram's buffer on
  the CPU that allocated it, instead of deferring the frees to the other core, where they
  would run during the drain;
- the end of a drain is seen from the worker's CPU time in /proc, read every POLL_S, not by
  polling /metrics, whose answers cost the server CPU on other threads;
- perf samples at SAMPLE_HZ without call graphs.
"""

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import report as fmt
from receiver import CLOCK_TICKS_PER_S, BenchError
from steps import CAPACITY_RCVBUF_BYTES, log

DRAINS = 6
DATAGRAMS = 1_000_000
SAMPLE_HZ = 4999
POLL_S = 0.1
# A drain is over when the worker's CPU time has not moved for this many polls.
IDLE_POLLS = 3
DRAIN_DEADLINE_S = 60
# The user-space symbols the report lists.
TOP_SYMBOLS = 8


@dataclass
class Profile:
    """One profiled run: DRAINS drains of DATAGRAMS each."""

    datagrams: int
    cpu_s: float
    user_share: float
    samples: int
    symbols: list  # (share of the worker's samples, symbol), the user-space ones

    @property
    def user_ns(self):
        return self.user_share * self.cpu_s / self.datagrams * 1e9


def perf_binary():
    return shutil.which("perf")


def step_profile(bench):
    """`runs` profiled runs, or None (with a note) when perf is missing or cannot sample."""
    if not perf_binary():
        bench.note("profile", "perf is not installed (Debian: linux-perf), so the user-space "
                              "profile was skipped")
        return None
    profiles = []
    for run in range(bench.settings.runs):
        profile = profile_run(bench, bench.logs / f"profile-{run + 1}.data")
        if profile is None:
            return None
        log(f"profile run {run + 1}: {profile.user_ns:.1f} ns a datagram in user space "
            f"({profile.user_share:.2%} of {profile.cpu_s:.2f} s, {profile.samples} samples)")
        profiles.append(profile)
    return profiles


def profile_run(bench, data_path):
    count = DATAGRAMS // 10 if bench.settings.quick else DATAGRAMS
    with bench.receiver("ipevents", "--workers", 1, "--rcvbuf",
                        CAPACITY_RCVBUF_BYTES) as receiver:
        bench.check_rcvbuf("profile", receiver, CAPACITY_RCVBUF_BYTES)
        tid = worker_thread(receiver.pid)
        cpu = thread_stat(receiver.pid, tid)["cpu"]
        perf_log = open(bench.logs / "perf.log", "a", encoding="utf-8")
        perf = subprocess.Popen(
            ["perf", "record", "-F", str(SAMPLE_HZ), "-t", str(tid), "-o", str(data_path)],
            stdout=perf_log, stderr=perf_log, stdin=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            if perf.poll() is not None:
                bench.note("profile", f"perf record exited at once (see {perf_log.name}): "
                                      "the profile was skipped")
                return None
            before = thread_stat(receiver.pid, tid)
            base = receiver.metrics()
            for _ in range(DRAINS):
                receiver.pause()
                try:
                    bench.loadgen.run(receiver, "--send-only", "--rate", 0, "--sockets", 64,
                                      "--count", count, bound_s=60, cpus={cpu})
                finally:
                    receiver.resume()
                wait_until_idle(receiver.pid, tid)
            after = thread_stat(receiver.pid, tid)
            drained = receiver.metrics().since(base).received
        finally:
            perf.send_signal(2)
            try:
                perf.wait(timeout=60)
            except subprocess.TimeoutExpired:
                perf.kill()
                perf.wait()
            perf_log.close()
    if drained < DRAINS * count:
        raise BenchError(f"profile: the server read {drained} of {DRAINS * count} datagrams")
    by_dso = parse_report_rows(perf_report(data_path, "dso"))
    samples = sum(count for count, _ in by_dso)
    if samples == 0:
        raise BenchError(f"profile: perf recorded no samples in {data_path}")
    return Profile(datagrams=drained, cpu_s=after["cpu_s"] - before["cpu_s"],
                   user_share=user_share(by_dso), samples=samples,
                   symbols=user_symbols(parse_report_rows(perf_report(data_path, "sym")),
                                        samples))


def worker_thread(pid):
    """The thread id of the server's worker 0."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm", encoding="utf-8") as comm:
                if comm.read().strip() == "worker-0":
                    return int(task)
        except FileNotFoundError:
            continue
    raise BenchError("profile: the server has no worker-0 thread")


def thread_stat(pid, tid):
    """The thread's CPU time (utime + stime, seconds) and the CPU it last ran on."""
    with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as stat:
        # The fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5), the CPU is field 39; `fields` starts
    # at field 3.
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S,
            "cpu": int(fields[36])}


def wait_until_idle(pid, tid):
    """Returns once the thread's CPU time has not moved for IDLE_POLLS polls."""
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    last, still = None, 0
    while still < IDLE_POLLS:
        if time.monotonic() > deadline:
            raise BenchError(f"profile: the worker was still busy after {DRAIN_DEADLINE_S} s")
        time.sleep(POLL_S)
        now = thread_stat(pid, tid)["cpu_s"]
        still = still + 1 if now == last else 0
        last = now


def perf_report(data_path, sort):
    """`perf report` of `data_path` by `sort`, with each row's sample count."""
    done = subprocess.run(
        ["perf", "report", "-i", str(data_path), "--stdio", "--no-children", "-n", "--sort",
         sort, "--percent-limit", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        check=False, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"perf report failed on {data_path}")
    return done.stdout.decode("utf-8", "replace")


def parse_report_rows(text):
    """(samples, the rest of the row) for each row of `perf report --stdio -n`, whose rows
    read "  96.58%   29545  [kernel.kallsyms]"."""
    rows = []
    for line in text.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 3 or not fields[0].endswith("%") or not fields[1].isdigit():
            continue
        rows.append((int(fields[1]), fields[2].strip()))
    return rows


def is_kernel(dso):
    return dso.startswith("[kernel") or dso == "[unknown]"


def user_share(rows):
    """The share of the samples outside the kernel, from the rows of a report by dso."""
    total = sum(samples for samples, _ in rows)
    user = sum(samples for samples, dso in rows if not is_kernel(dso))
    return user / total if total else 0.0


def user_symbols(rows, total):
    """The TOP_SYMBOLS user-space symbols with the most samples, (share, symbol), from the
    rows of a report by symbol; a row reads "[.] symbol" in user space, "[k] symbol" in the
    kernel."""
    symbols = []
    for samples, rest in rows:
        kind, _, symbol = rest.partition(" ")
        if kind == "[.]":
            symbols.append((samples / total, symbol.strip()))
    return symbols[:TOP_SYMBOLS]


def profile_section(bench, profiles):
    head = ["## 1c. The worker's user-space time per datagram, from perf", ""]
    if not profiles:
        return head + ["Not measured (see the notes)."]
    figure = fmt.Figure([p.user_ns for p in profiles])
    count = profiles[0].datagrams // DRAINS
    rows = [[i + 1, f"{p.user_ns:.1f}", f"{p.user_share:.2%}", f"{p.cpu_s:.2f} s",
             p.samples] for i, p in enumerate(profiles)]
    symbols = [[f"{share:.2%}", f"`{symbol}`"] for share, symbol in profiles[0].symbols]
    return head + [
        f"One worker drains {DRAINS} × {count:,} queued reference datagrams under `perf record "
        f"-F {SAMPLE_HZ} -t TID` of the worker thread; loadgen runs on the worker's CPU and "
        "the end of each drain is seen from /proc, so that the other core stays idle. The "
        "figure is the share of samples in user space × the thread's CPU time ÷ the "
        "datagrams.",
        "",
        f"**{figure.show(lambda ns: f'{ns:.1f}')} ns a datagram** in user space.",
        "",
        fmt.table(["run", "user ns per datagram", "user share", "worker CPU", "samples"], rows),
        "",
        "The user-space symbols of run 1, as shares of the worker's samples:",
        "",
        fmt.table(["share", "symbol"], symbols),
    ]
