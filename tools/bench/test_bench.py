"""Unit tests of the benchmark's pure helpers: parsing, figures, the search, the plot.

Run them with `PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s tools/bench`.
"""

import unittest
import xml.etree.ElementTree as ElementTree

import cluster
import steps
import report
from plot import hand_drawn_svg
from receiver import LISTENING, BenchError, Counters, parse_metrics, parse_proc_net_udp

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


class ClusterStep(unittest.TestCase):
    def test_samples_sum_over_labels(self):
        text = "\n".join([
            "# HELP ipevents_store_flush_errors_total x",
            "# TYPE ipevents_store_flush_errors_total counter",
            'ipevents_store_flush_errors_total{kind="timeout"} 2',
            'ipevents_store_flush_errors_total{kind="cluster"} 3',
            "ipevents_store_pending_pairs 0",
            'ipevents_store_round_trip_seconds{quantile="0.5"} 0.000250000',
        ])
        totals = cluster.samples(text)
        self.assertEqual(totals["ipevents_store_flush_errors_total"], 5)
        self.assertEqual(totals["ipevents_store_pending_pairs"], 0)
        self.assertAlmostEqual(totals["ipevents_store_round_trip_seconds"], 0.00025)

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
