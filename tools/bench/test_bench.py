"""Unit tests of the benchmark's pure helpers: parsing, figures, the search, the plot.

Run them with `PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s tools/bench`.
"""

import unittest
import xml.etree.ElementTree as ElementTree

import os
import threading
import time

import cluster
import perf_profile
import report
import scale
import sections
import steps
from types import SimpleNamespace
from plot import hand_drawn_svg
from receiver import (
    LISTENING,
    STEERING,
    BenchError,
    Counters,
    parse_metrics,
    parse_proc_net_udp,
    parse_quantiles,
    parse_report_row,
    samples,
)

SERVER_METRICS = """\
# HELP ipevents_datagrams_received_total Datagrams read from the UDP socket.
# TYPE ipevents_datagrams_received_total counter
ipevents_datagrams_received_total{worker="0"} 120
ipevents_datagrams_received_total{worker="1"} 80
ipevents_events_ingested_total{worker="0"} 119
ipevents_events_ingested_total{worker="1"} 80
ipevents_kernel_drops_total{worker="0"} 3
ipevents_kernel_drops_total{worker="1"} 0
ipevents_apps_tracked 7
ipevents_ingest_latency_seconds{quantile="0.5"} 0.000012
"""

# Two sockets of one group on port 0x1F90 (8080) and one on another port.
PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:1F90 00000000:0000 07 00000000:00000400 00:00000000 00000000     0        0 1 2 0000000000000000 5
  101: 0100007F:1F90 00000000:0000 07 00000000:00000100 00:00000000 00000000     0        0 2 2 0000000000000000 0
  102: 0100007F:1F91 00000000:0000 07 00000000:00009999 00:00000000 00000000     0        0 3 2 0000000000000000 9
"""


class Parsing(unittest.TestCase):
    def test_metrics(self):
        counters = parse_metrics(SERVER_METRICS)
        self.assertEqual(counters, Counters(received=200, ingested=199, kernel_drops=3,
                                            apps_tracked=7, received_per_worker=[120, 80]))
        discard = parse_metrics('ipevents_datagrams_received_total{worker="0"} 5\n')
        self.assertEqual((discard.received, discard.ingested), (5, None))
        with self.assertRaises(BenchError):
            parse_metrics("something_else 1\n")

    def test_deltas(self):
        before = Counters(received=10, ingested=9, kernel_drops=1, received_per_worker=[4, 6])
        after = Counters(received=30, ingested=29, kernel_drops=1, apps_tracked=5,
                         received_per_worker=[14, 16])
        self.assertEqual(after.since(before), Counters(received=20, ingested=20, kernel_drops=0,
                                                       apps_tracked=5,
                                                       received_per_worker=[10, 10]))

    def test_proc_net_udp(self):
        self.assertEqual(parse_proc_net_udp(PROC_NET_UDP, 8080), (0x500, 5, 2))
        self.assertEqual(parse_proc_net_udp(PROC_NET_UDP, 9), (0, 0, 0))

    def test_listening_line(self):
        line = ("ipevents: listening udp=127.0.0.1:40000 http=127.0.0.1:40001 workers=2 "
                "steering=random rcvbuf_bytes=16777216 batch=64")
        match = LISTENING.search(line)
        self.assertEqual((match["udp"], match["http"], match["rcvbuf"]),
                         ("127.0.0.1:40000", "127.0.0.1:40001", "16777216"))
        self.assertEqual(STEERING.search(line)["steering"], "random")
        self.assertIsNone(STEERING.search("listening udp=x http=y rcvbuf_bytes=1"))

    def test_samples_sum_over_labels(self):
        text = "\n".join([
            "# HELP ipevents_store_flush_errors_total x",
            "# TYPE ipevents_store_flush_errors_total counter",
            'ipevents_store_flush_errors_total{kind="timeout"} 2',
            'ipevents_store_flush_errors_total{kind="cluster"} 3',
            "ipevents_store_pending_pairs 0",
            'ipevents_store_round_trip_seconds{quantile="0.5"} 0.000250000',
        ])
        totals = samples(text)
        self.assertEqual(totals["ipevents_store_flush_errors_total"], 5)
        self.assertEqual(totals["ipevents_store_pending_pairs"], 0)
        self.assertAlmostEqual(totals["ipevents_store_round_trip_seconds"], 0.00025)

    def test_summary_quantiles(self):
        text = "\n".join([
            "# TYPE ipevents_batch_seconds summary",
            'ipevents_batch_seconds{quantile="0.5"} 0.000012000',
            'ipevents_batch_seconds{quantile="0.999"} 0.004100000',
            "ipevents_batch_seconds_sum 1.5",
            'ipevents_ingest_latency_seconds{quantile="0.999"} 9',
        ])
        self.assertEqual(parse_quantiles(text, "ipevents_batch_seconds"),
                         {0.5: 0.000012, 0.999: 0.0041})
        self.assertEqual(parse_quantiles(text, "ipevents_query_seconds"), {})

    def test_shutdown_report_row(self):
        # As src/metrics.rs prints it: the name in 10 columns, then six right-aligned ones.
        lines = [
            "totals: received 10, ingested 10, kernel drops 0, recv errors 0\n",
            "latency             p50          p90          p99        p99.9          max"
            "        count\n",
            "ingest           41.0us       60.0us        1.2ms        1.5ms        2.00s"
            "         4821\n",
            "batch             450ns       12.0us      950.0us        3.1ms       25.4ms"
            "         4821\n",
        ]
        row = parse_report_row(lines, "batch")
        self.assertEqual(row["count"], 4821)
        for column, seconds in (("p50", 450e-9), ("p90", 12e-6), ("p99", 950e-6),
                                ("p99.9", 3.1e-3), ("max", 25.4e-3)):
            self.assertAlmostEqual(row[column], seconds, msg=column)
        self.assertAlmostEqual(parse_report_row(lines, "ingest")["max"], 2.0)
        self.assertIsNone(parse_report_row(lines, "query"))
        self.assertIsNone(parse_report_row(["batch 1ms 2ms 3ms 4ms soon 5\n"], "batch"))


class ClusterStep(unittest.TestCase):
    def test_cluster_flags_name_every_seed(self):
        class Fake:
            seeds = "redis://127.0.0.1:1,redis://127.0.0.1:2"
        self.assertEqual(cluster.cluster_flags(Fake(), "p"),
                         ("--redis-cluster", Fake.seeds, "--redis-prefix", "p"))


class Figures(unittest.TestCase):
    def test_median_min_max(self):
        self.assertEqual(report.Figure([3, 1, 2]).show(str), "2 [1–3]")
        self.assertEqual(report.Figure([5]).show(str), "5")
        self.assertEqual(report.Figure([None]).show(str), "n/a")

    def test_units(self):
        self.assertEqual(report.rate(1_234_567), "1.23M")
        self.assertEqual(report.rate(950), "950")
        self.assertEqual(report.size(3 << 20), "3 MiB")


def fake_trial(limit_per_s, sender_max_per_s=float("inf"), sender_max_two_per_s=None):
    """A receiver that loses above `limit_per_s`, behind a sender that reaches at most
    `sender_max_per_s` with one thread (and `sender_max_two_per_s` with two)."""
    def trial(rate, threads):
        top = sender_max_two_per_s if threads == 2 and sender_max_two_per_s else sender_max_per_s
        achieved = min(rate, top)
        loss = 0.0 if achieved <= limit_per_s else 1.0
        return steps.Trial("x", 0, rate, achieved, loss, threads)
    return trial


class DrainPolling(unittest.TestCase):
    def test_polls_often_only_near_the_end(self):
        # Nothing read yet: the shortest sleep.
        self.assertEqual(steps.next_poll_s(0, 1_000_000, 0.01), steps.DRAIN_POLL_S)
        # A tenth read in 0.1 s: 0.9 s left, so the longest sleep.
        self.assertEqual(steps.next_poll_s(100_000, 1_000_000, 0.1), steps.DRAIN_POLL_MAX_S)
        # 20 ms left: sleep 10 ms.
        self.assertAlmostEqual(steps.next_poll_s(980_000, 1_000_000, 0.98), 0.01)
        # Almost there: the shortest sleep again.
        self.assertEqual(steps.next_poll_s(999_999, 1_000_000, 1.0), steps.DRAIN_POLL_S)


class PairedDrains(unittest.TestCase):
    def test_the_receivers_alternate_which_drains_first(self):
        self.assertEqual(steps.drain_order(3), ["ipevents", "discard", "discard", "ipevents",
                                                "ipevents", "discard"])
        for runs in range(1, 6):
            order = steps.drain_order(runs)
            self.assertEqual(order.count("ipevents"), runs)
            self.assertEqual(order.count("discard"), runs)

    def test_the_capacity_section_says_how_the_drains_were_measured(self):
        settings = SimpleNamespace(runs=1, cores=2)
        drain = steps.Drain(count=1000, elapsed_s=0.001, sent_per_s=1e6, drops=0,
                            queued_bytes=832_000, busiest_share=0.5, complete=True)
        results = {(kind, workers, steering): [drain] for kind in steps.RECEIVERS
                   for workers, steering in steps.capacity_configs(2)}
        for paired in (False, True):
            for calibrating in (False, True):
                bench = SimpleNamespace(settings=settings, paired_drains=paired,
                                        calibrating=calibrating)
                text = "\n".join(sections.capacity_section(bench, results))
                self.assertEqual("With `--paired-drains`" in text, paired)
                self.assertEqual("**Calibration**" in text, calibrating)
                self.assertIn("loadgen runs on the first CPU", text)
                self.assertIn("| 1 | — (one socket) | 1,000 | 1M | 1M | 1.00 |", text)


class CapacityReceivers(unittest.TestCase):
    def test_each_seat_runs_its_binary_and_steering(self):
        binaries = {"ipevents": "/bin/ipevents", "discard": "/bin/discard"}
        # (calibrating, seat, steering): (binary, the steering it is started with)
        cases = {
            (False, "ipevents", "adaptive"): (None, "adaptive"),
            (False, "discard", "adaptive"): ("/bin/discard", "random"),
            (False, "ipevents", "hash"): (None, "hash"),
            (False, "discard", "cpu"): ("/bin/discard", "cpu"),
            (True, "ipevents", "adaptive"): ("/bin/discard", "random"),
            (True, "ipevents", "app"): ("/bin/discard", "app"),
            (True, "discard", "adaptive"): ("/bin/discard", "random"),
        }
        for (calibrating, kind, steering), (binary, flag) in cases.items():
            started = []
            bench = SimpleNamespace(binaries=binaries, calibrating=calibrating,
                                    receiver=lambda *a, **kw: started.append((a, kw)))
            steps.capacity_receiver(bench, kind, 2, steering)
            (args, kwargs), = started
            self.assertEqual(args, (kind, "--workers", 2, "--steering", flag,
                                    "--rcvbuf", steps.CAPACITY_RCVBUF_BYTES))
            self.assertEqual(kwargs, {"binary": binary}, (calibrating, kind, steering))


class Search(unittest.TestCase):
    def test_doubles_then_bisects(self):
        search = steps.search_lossless(fake_trial(limit_per_s=500_000))
        offered = [t.offered_per_s for t in search.trials]
        self.assertEqual(offered[:4], [100_000, 200_000, 400_000, 800_000])
        self.assertEqual(len(offered), 4 + steps.SEARCH_BISECTIONS)
        rate, limited = search.best()
        self.assertFalse(limited)
        self.assertTrue(400_000 <= rate <= 500_000)

    def test_halves_when_the_start_rate_loses(self):
        search = steps.search_lossless(fake_trial(limit_per_s=30_000))
        self.assertEqual([t.offered_per_s for t in search.trials][:3], [100_000, 50_000, 25_000])
        self.assertTrue(25_000 <= search.best()[0] <= 30_000)

    def test_sender_limit_tries_two_threads_then_stops(self):
        search = steps.search_lossless(
            fake_trial(limit_per_s=10**9, sender_max_per_s=250_000,
                       sender_max_two_per_s=300_000))
        self.assertEqual([(t.offered_per_s, t.threads) for t in search.trials],
                         [(100_000, 1), (200_000, 1), (400_000, 1), (400_000, 2)])
        self.assertEqual(search.best(), (300_000, True))
        self.assertEqual(search.threads(), 2)

    def test_second_thread_lifts_the_sender_limit(self):
        search = steps.search_lossless(
            fake_trial(limit_per_s=700_000, sender_max_per_s=250_000,
                       sender_max_two_per_s=10**9))
        self.assertEqual(search.threads(), 2)
        rate, limited = search.best()
        self.assertFalse(limited)
        self.assertTrue(600_000 <= rate <= 700_000)

    def test_sender_limit_with_two_threads_after_progress(self):
        # Two threads reach 400k/s but not 800k/s, and the receiver never loses.
        search = steps.search_lossless(
            fake_trial(limit_per_s=10**9, sender_max_per_s=150_000,
                       sender_max_two_per_s=390_000))
        self.assertEqual(search.best(), (400_000, True))


class ScaleFigures(unittest.TestCase):
    def test_ratios(self):
        for numerator, denominator, want in ((115, 100, 1.15), (1, None, None),
                                             (None, 2, None), (3, 0, None), (0, 4, 0.0)):
            self.assertEqual(scale.ratio_of(numerator, denominator), want,
                             (numerator, denominator))

    def test_share_given_back(self):
        mib = 1 << 20
        for before, after, later, want in ((100 * mib, 500 * mib, 180 * mib, 0.8),
                                           (100 * mib, 500 * mib, 500 * mib, 0.0),
                                           (100 * mib, 500 * mib, 90 * mib, 1.025),
                                           (100 * mib, 100 * mib, 90 * mib, None)):
            got = scale.share_given_back(before, after, later)
            if want is None:
                self.assertIsNone(got)
            else:
                self.assertAlmostEqual(got, want)

    def test_peak_rise(self):
        self.assertAlmostEqual(scale.peak_rise_share(1000, [1000, 1080, 1050]), 0.08)
        self.assertEqual(scale.peak_rise_share(1000, [990, 1000]), 0.0)
        self.assertIsNone(scale.peak_rise_share(1000, []))

    def test_longest_batch_prefers_the_report_max(self):
        row = {"p99.9": 0.003, "max": 0.025, "count": 7}
        self.assertEqual(scale.longest_batch_s(row, {0.999: 0.004}),
                         (0.025, "max (shutdown report)"))
        self.assertEqual(scale.longest_batch_s(None, {0.5: 0.001, 0.999: 0.004}),
                         (0.004, "p99.9 (/metrics; no max there)"))
        self.assertEqual(scale.longest_batch_s(None, {}), (None, "n/a"))

    def test_balance_alternates_which_mode_goes_first(self):
        firsts = [scale.balance_order(run)[0][0] for run in range(4)]
        self.assertEqual(firsts, ["default", "random", "default", "random"])
        for run in range(2):
            self.assertEqual(sorted(mode for mode, _ in scale.balance_order(run)),
                             ["default", "random"])

    def test_durations_in_their_unit(self):
        self.assertEqual(scale.seconds_as_ms(0.178), "178 ms")
        self.assertEqual(scale.seconds_as_ms(4.818), "4.82 s")

    def test_verdicts(self):
        for value, goal, at_most, want in ((0.02, 0.02, True, "yes"), (0.021, 0.02, True, "no"),
                                           (0.9, 0.9, False, "yes"), (0.89, 0.9, False, "no"),
                                           (None, 1, True, "n/a")):
            self.assertEqual(scale.verdict(value, goal, at_most), want, (value, goal))

    def test_the_section_renders_every_measurement(self):
        settings = SimpleNamespace(runs=1, cores=2, capacity_count=1000, memory_apps=100,
                                   scale_workers_apps=10, scale_growth_apps=20,
                                   scale_reset_apps=30)
        bench = SimpleNamespace(settings=settings)
        load = dict(apps=10, pairs=160, datagrams=480, sent=480, lost=0, drops=0,
                    sent_per_s=149_000.0, entries=10, before=1 << 20, after=3 << 20,
                    grown=2 << 20, per_pair=13107.2, steering="random", rcvbuf=16 << 20)
        drain = steps.Drain(count=1000, elapsed_s=0.001, sent_per_s=1e6, drops=0,
                            queued_bytes=832_000, busiest_share=0.5, complete=True)
        memory = dict(stored=1600, entries=200, after=4 << 20, per_pair=21.5, drops=0,
                      steering="random")
        results = dict(
            workers={label: [load] for label, _ in scale.WORKER_CONFIGS},
            balance=[dict(default=drain, random=drain, default_steering="random",
                          random_steering="random", ratio=1.0)],
            growth=[dict(load, longest_batch_s=0.0254, longest_source="max (shutdown report)",
                         p999_s=0.003, batches=77)],
            resets={"glibc": [dict(load, reset_s=0.012, given_back=0.75, capacity_per_s=1e6,
                                   rss_after_reset={s: 1 << 20
                                                    for s in scale.RSS_AFTER_RESET_S})],
                    "mimalloc": [], "jemalloc": []},
            pairs={"default": ([memory], 150_000), "random": ([memory], 150_000)},
            snapshot=[dict(load, rss_before_snapshot=100 << 20, rss_peak=108 << 20,
                           rise=0.08, snapshot_s=0.5, wall_s=0.6, file_bytes=1 << 20,
                           rss_samples=60)],
        )
        text = "\n".join(scale.scale_section(bench, results))
        # The growth pause misses its goal (25.4 ms), the bytes per pair too (21.5).
        for wanted in ("## 7. One node at full scale", "| 1 worker |", "25.4 ms | 3 ms",
                       "| 0 | 0 | no |", "75%", "| mimalloc | n/a", "| 8% | yes |",
                       "21.5 B | no |",
                       "default (random)", "1 (the base)"):
            self.assertIn(wanted, text)


# `perf report --stdio --no-children -n` by dso, then by symbol, as perf 6 prints them.
PERF_BY_DSO = """\
# Samples: 30K of event 'cpu-clock:ppp'
# Overhead       Samples  Shared Object
# ........  ............  .................
#
    96.58%         29545  [kernel.kallsyms]
     3.05%           932  ipevents
     0.27%            82  libc.so.6
     0.10%            31  [vdso]
"""
PERF_BY_SYMBOL = """\
# Overhead       Samples  Symbol
    40.00%         12236  [k] _copy_to_iter
     2.30%           704  [.] ipevents::worker::Worker::receive_batch
     0.55%           168  [.] hex_simd::multiversion::decode::avx2
     0.10%            31  [.] __vdso_clock_gettime
"""


class PerfProfile(unittest.TestCase):
    def test_user_share_counts_every_dso_outside_the_kernel(self):
        rows = perf_profile.parse_report_rows(PERF_BY_DSO)
        self.assertEqual([samples for samples, _ in rows], [29545, 932, 82, 31])
        self.assertAlmostEqual(perf_profile.user_share(rows), (932 + 82 + 31) / 30590)

    def test_user_symbols_leave_out_the_kernel(self):
        rows = perf_profile.parse_report_rows(PERF_BY_SYMBOL)
        symbols = perf_profile.user_symbols(rows, 30590)
        self.assertEqual([name for _, name in symbols], [
            "ipevents::worker::Worker::receive_batch",
            "hex_simd::multiversion::decode::avx2",
            "__vdso_clock_gettime",
        ])
        self.assertAlmostEqual(symbols[0][0], 704 / 30590)

    def test_user_ns_is_the_user_share_of_the_cpu_time(self):
        profile = perf_profile.Profile(datagrams=6_000_000, cpu_s=6.0, user_share=0.04,
                                       samples=30000, symbols=[])
        self.assertAlmostEqual(profile.user_ns, 40.0)
        self.assertAlmostEqual(profile.total_ns, 1000.0)

    def test_kernel_symbols_fall_into_their_parts(self):
        copy, free, queue, call = (part for part, _ in perf_profile.KERNEL_PARTS)
        for symbol, want in [
            ("_copy_to_iter", copy),
            ("__check_heap_object", copy),
            ("skb_release_data", free),
            ("slab_update_freelist.isra.0", free),
            ("native_write_msr", free),
            ("kfree", free),
            ("udp_recvmsg", queue),
            ("udp_rmem_release", queue),
            ("_raw_spin_unlock_bh", queue),
            ("___sys_recvmsg", call),
            ("____sys_recvmsg", call),
            ("__x64_sys_recvmmsg", call),
            ("__import_iovec", call),
            ("__put_user_nocheck_4", call),
            ("srso_alias_return_thunk", call),
            ("_raw_spin_unlock_irqrestore", perf_profile.OTHER_KERNEL),
            ("__raw_callee_save___pv_queued_spin_unlock", perf_profile.OTHER_KERNEL),
            ("ktime_get", perf_profile.OTHER_KERNEL),
        ]:
            self.assertEqual(perf_profile.kernel_part(symbol), want, symbol)

    def test_part_shares_split_every_sample(self):
        rows = perf_profile.parse_report_rows(PERF_BY_SYMBOL + "     0.50%   150  [k] ktime_get\n")
        shares = perf_profile.part_shares(rows)
        total = 12236 + 704 + 168 + 31 + 150
        self.assertAlmostEqual(shares[perf_profile.USER_SPACE], (704 + 168 + 31) / total)
        self.assertAlmostEqual(shares[perf_profile.KERNEL_PARTS[0][0]], 12236 / total)
        self.assertAlmostEqual(shares[perf_profile.OTHER_KERNEL], 150 / total)
        self.assertAlmostEqual(sum(shares.values()), 1.0)

    def test_gap_rows_compare_the_runs_pairwise(self):
        def profile(cpu_s, user_share):
            parts = {perf_profile.USER_SPACE: user_share, "kernel": 1 - user_share}
            return perf_profile.Profile(datagrams=1_000_000, cpu_s=cpu_s, user_share=user_share,
                                        samples=1000, symbols=[], parts=parts)
        profiles = {
            "ipevents": [profile(1.0, 0.04), profile(0.8, 0.05), profile(0.9, 0.04)],
            "discard": [profile(0.9, 0.01), profile(0.8, 0.01), profile(0.8, 0.01)],
        }
        rows = {row[0]: row[1:] for row in perf_profile.gap_rows(profiles)}
        self.assertEqual(rows[perf_profile.USER_SPACE],
                         ["40.0 [36.0–40.0]", "8.0 [8.0–9.0]", "+31.0 [+28.0–+32.0]"])
        # Differences 100, 0 and 100 ns: the median of the pairs, not the medians' gap.
        self.assertEqual(rows["total"],
                         ["900.0 [800.0–1000.0]", "800.0 [800.0–900.0]", "+100.0 [+0.0–+100.0]"])

    def test_worker_thread_waits_for_a_thread_to_name_itself(self):
        # As a receiver's thread does once it runs, which may be after the receiver is up.
        named, stop = threading.Event(), threading.Event()
        ids = []
        def late_namer():
            ids.append(threading.get_native_id())
            time.sleep(0.2)
            with open(f"/proc/self/task/{ids[0]}/comm", "w", encoding="utf-8") as comm:
                comm.write("late-namer")
            named.set()
            stop.wait(10)
        thread = threading.Thread(target=late_namer)
        thread.start()
        try:
            while not ids:
                time.sleep(0.001)
            self.assertFalse(named.is_set())
            self.assertEqual(perf_profile.worker_thread(os.getpid(), "late-namer"), ids[0])
        finally:
            stop.set()
            thread.join()
        # A name no thread takes: an error once the wait is over (shortened here).
        wait_s = perf_profile.THREAD_NAME_WAIT_S
        perf_profile.THREAD_NAME_WAIT_S = 0.1
        try:
            with self.assertRaises(perf_profile.BenchError):
                perf_profile.worker_thread(os.getpid(), "never-named")
        finally:
            perf_profile.THREAD_NAME_WAIT_S = wait_s

    def test_thread_stat_reads_this_thread(self):
        # A thread that burns CPU until told to stop, read through /proc like the worker.
        stop = threading.Event()
        ids = []
        def spin():
            ids.append(threading.get_native_id())
            while not stop.is_set():
                pass
        thread = threading.Thread(target=spin)
        thread.start()
        try:
            while not ids:
                pass
            first = perf_profile.thread_stat(os.getpid(), ids[0])
            deadline = time.monotonic() + 5
            while perf_profile.thread_stat(os.getpid(), ids[0])["cpu_s"] <= first["cpu_s"]:
                self.assertLess(time.monotonic(), deadline, "the thread's CPU time never moved")
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join()
        self.assertIn(first["cpu"], os.sched_getaffinity(0))


class Plot(unittest.TestCase):
    def test_hand_drawn_svg_is_well_formed(self):
        series = {"ipevents": [[(100e3, 0.0), (200e3, 0.5)], [(100e3, 0.0)]],
                  "discard": [[(100e3, 0.0), (400e3, 12.0)]]}
        root = ElementTree.fromstring(hand_drawn_svg(series))
        lines = root.findall("{http://www.w3.org/2000/svg}polyline")
        self.assertEqual(len(lines), 3)
        ElementTree.fromstring(hand_drawn_svg({}))


if __name__ == "__main__":
    unittest.main()
