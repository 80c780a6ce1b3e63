"""Step 1c: the worker's own user-space time per datagram, from a perf profile of the real
server draining its socket (`bench.py --profile-only`, and part of the full run when `perf`
is installed), and where a datagram's time goes against the discard receiver's.

One receiver with one worker, the server then discard in each run. Each of DRAINS rounds
stops it, queues DATAGRAMS reference datagrams in its socket, resumes it and waits until the
worker is idle again, while `perf record` samples the worker thread alone. The figure is the
share of samples outside the kernel times the thread's CPU time (utime + stime from /proc),
over the datagrams drained; the samples of each part of KERNEL_PARTS count the same way, so
that the two receivers' costs can be compared part by part.

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

import fnmatch
import shutil
import subprocess
import time
from dataclasses import dataclass

import report as fmt
from receiver import BenchError, proc_stat, stat_cpu_s, thread_named
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
# Each receiver's worker thread, by name, and how long it may take to show that name.
WORKER_THREADS = {"ipevents": "worker-0", "discard": "discard-0"}
THREAD_NAME_WAIT_S = 5
RECEIVERS = ("ipevents", "discard")

# The parts of the kernel's receive path a datagram's time is split into, each with the
# symbols of Linux 6 that it is made of (names, or `fnmatch` patterns). A symbol of none of
# them, such as a spinlock's unlock that any of them may call, counts as "other kernel".
KERNEL_PARTS = (
    ("copy to the worker's buffer", (
        "_copy_to_iter", "__check_object_size", "__check_heap_object", "__virt_addr_valid",
        "check_stack_object", "is_vmalloc_addr", "kmem_cache_size", "simple_copy_to_iter",
        "skb_copy_datagram_iter", "__skb_datagram_iter")),
    ("freeing the skb (locally, or an IPI to the CPU that allocated it)", (
        "skb_release_*", "kfree*", "*slab*", "kmem_cache_free*", "napi_skb_cache_*",
        "skb_attempt_defer_free", "native_write_msr", "x2apic_*", "smp_call_function*",
        "generic_exec_single", "*free_frozen_page*", "free_unref_*", "put_cpu_partial",
        "__put_partials", "build_detached_freelist", "__get_pfnblock_flags_mask*",
        "mod_node_page_state", "__free_pages*")),
    ("the UDP receive queue", (
        "udp_*", "__udp*", "__skb_recv_udp", "__skb_try_recv_from_queue", "skb_consume_udp",
        "_raw_spin_lock_bh", "_raw_spin_unlock_bh", "__local_bh_enable_ip", "inet_recvmsg",
        "sock_recvmsg", "security_socket_recvmsg", "sock_rfree")),
    ("the recvmmsg call (each msghdr and iovec in, lengths and flags out)", (
        "*sys_recvm*", "*sys_recvmsg", "do_recvmmsg", "copy_msghdr_from_user", "*import_iovec",
        "copy_iovec_from_user", "import_ubuf", "_copy_from_user", "__put_user*",
        "do_syscall_64", "entry_SYSCALL*", "syscall_*", "srso_*", "fdget", "fput",
        "__cond_resched")),
)
OTHER_KERNEL = "other kernel"
USER_SPACE = "user space (for the server: parse, table, batch loop)"


@dataclass
class Profile:
    """One profiled run of one receiver: DRAINS drains of DATAGRAMS each."""

    datagrams: int
    cpu_s: float
    user_share: float
    samples: int
    symbols: list  # (share of the worker's samples, symbol), the user-space ones
    parts: dict = None  # {part: share of the worker's samples}, user space and KERNEL_PARTS

    @property
    def user_ns(self):
        return self.ns(self.user_share)

    @property
    def total_ns(self):
        return self.ns(1.0)

    def ns(self, share):
        """The worker's CPU time per datagram that a share of its samples stands for."""
        return share * self.cpu_s / self.datagrams * 1e9


def perf_binary():
    return shutil.which("perf")


def step_profile(bench):
    """{receiver: `runs` profiled runs}, the server then discard in each run; or None (with a
    note) when perf is missing or cannot sample."""
    if not perf_binary():
        bench.note("profile", "perf is not installed (Debian: linux-perf), so the user-space "
                              "profile was skipped")
        return None
    profiles = {kind: [] for kind in RECEIVERS}
    for run in range(bench.settings.runs):
        for kind in RECEIVERS:
            profile = profile_run(bench, bench.logs / f"profile-{kind}-{run + 1}.data", kind)
            if profile is None:
                return None
            log(f"profile run {run + 1}, {kind}: {profile.total_ns:.0f} ns a datagram, "
                f"{profile.user_ns:.1f} of it in user space ({profile.user_share:.2%} of "
                f"{profile.cpu_s:.2f} s, {profile.samples} samples)")
            profiles[kind].append(profile)
    return profiles


def profile_run(bench, data_path, kind="ipevents"):
    count = DATAGRAMS // 10 if bench.settings.quick else DATAGRAMS
    with bench.receiver(kind, "--workers", 1, "--rcvbuf",
                        CAPACITY_RCVBUF_BYTES) as receiver:
        bench.check_rcvbuf("profile", receiver, CAPACITY_RCVBUF_BYTES)
        tid = worker_thread(receiver.pid, WORKER_THREADS[kind])
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
        raise BenchError(f"profile: {kind} read {drained} of {DRAINS * count} datagrams")
    by_dso = parse_report_rows(perf_report(data_path, "dso"))
    samples = sum(count for count, _ in by_dso)
    if samples == 0:
        raise BenchError(f"profile: perf recorded no samples in {data_path}")
    by_symbol = parse_report_rows(perf_report(data_path, "sym"))
    return Profile(datagrams=drained, cpu_s=after["cpu_s"] - before["cpu_s"],
                   user_share=user_share(by_dso), samples=samples,
                   symbols=user_symbols(by_symbol, samples), parts=part_shares(by_symbol))


def worker_thread(pid, name):
    """The thread id of the receiver's thread called `name`. A thread names itself once it
    runs, which may be after the receiver printed that it listens, so this waits up to
    THREAD_NAME_WAIT_S for the name."""
    deadline = time.monotonic() + THREAD_NAME_WAIT_S
    while (thread := thread_named(pid, name)) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"profile: the receiver has no {name} thread")
        time.sleep(0.01)
    return thread


def thread_stat(pid, tid):
    """The thread's CPU time (utime + stime, seconds) and the CPU it last ran on (field 39 of
    stat(5))."""
    fields = proc_stat(pid, tid)
    return {"cpu_s": stat_cpu_s(fields), "cpu": int(fields[36])}


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


def kernel_part(symbol):
    """The part of KERNEL_PARTS a kernel symbol belongs to, or OTHER_KERNEL."""
    for part, patterns in KERNEL_PARTS:
        for pattern in patterns:
            if fnmatch.fnmatchcase(symbol, pattern):
                return part
    return OTHER_KERNEL


def part_shares(rows):
    """{part: share of all samples} from the rows of a report by symbol: USER_SPACE for the
    user-space rows ("[.]"), a part of KERNEL_PARTS or OTHER_KERNEL for the kernel's ("[k]")."""
    total = sum(samples for samples, _ in rows)
    shares = dict.fromkeys([USER_SPACE, *(part for part, _ in KERNEL_PARTS), OTHER_KERNEL], 0.0)
    for samples, rest in rows:
        kind, _, symbol = rest.partition(" ")
        part = kernel_part(symbol.strip()) if kind == "[k]" else USER_SPACE
        shares[part] += samples / total if total else 0.0
    return shares


def gap_rows(profiles):
    """The report's rows of where a datagram's time goes: for each part, the server's and
    discard's ns a datagram over the runs, and their difference run by run (the server's run
    k against discard's run k), each as median [min–max]."""
    pairs = list(zip(profiles["ipevents"], profiles["discard"]))
    show = lambda values, unit: fmt.Figure(values).show(unit)
    rows = []
    for part in [*pairs[0][0].parts, "total"]:
        ns = lambda p: p.total_ns if part == "total" else p.ns(p.parts[part])
        rows.append([part, show([ns(a) for a, _ in pairs], "{:.1f}".format),
                     show([ns(b) for _, b in pairs], "{:.1f}".format),
                     show([ns(a) - ns(b) for a, b in pairs], lambda x: f"{x + 0.0:+.1f}")])
    return rows


def profile_section(bench, profiles):
    head = ["## 1c. The worker's user-space time per datagram, from perf", ""]
    if not profiles:
        return head + ["Not measured (see the notes)."]
    server = profiles["ipevents"]
    figure = fmt.Figure([p.user_ns for p in server])
    count = server[0].datagrams // DRAINS
    rows = [[i + 1, f"{p.user_ns:.1f}", f"{p.user_share:.2%}", f"{p.cpu_s:.2f} s",
             p.samples, f"{d.total_ns:.0f} / {p.total_ns:.0f}"]
            for i, (p, d) in enumerate(zip(server, profiles["discard"]))]
    symbols = [[f"{share:.2%}", f"`{symbol}`"] for share, symbol in server[0].symbols]
    return head + [
        f"One worker drains {DRAINS} × {count:,} queued reference datagrams under `perf record "
        f"-F {SAMPLE_HZ} -t TID` of the worker thread; loadgen runs on the worker's CPU and "
        "the end of each drain is seen from /proc, so that the other core stays idle. The "
        "figure is the share of samples in user space × the thread's CPU time ÷ the "
        "datagrams. Each run profiles the server, then the discard receiver the same way.",
        "",
        f"**{figure.show(lambda ns: f'{ns:.1f}')} ns a datagram** in user space.",
        "",
        fmt.table(["run", "user ns per datagram", "user share", "worker CPU", "samples",
                   "all ns per datagram, discard / server"], rows),
        "",
        "The user-space symbols of run 1, as shares of the worker's samples:",
        "",
        fmt.table(["share", "symbol"], symbols),
        "",
        "Where a datagram's CPU time goes, in ns, the server against the discard receiver "
        "(each kernel symbol put in one part by name; median [min–max] over the runs, the "
        "difference taken run by run):",
        "",
        fmt.table(["part", "server", "discard", "server − discard"], gap_rows(profiles)),
    ]
