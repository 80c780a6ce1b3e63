"""Runs the load generator against a receiver and returns its `--json` summary.

A wrong answer from the server (loadgen exit code 1) ends the benchmark loudly: figures
measured on a server that answers wrongly are worthless.
"""

import json
import os
import subprocess

from receiver import BenchError

# Time a loadgen run may take beyond its own bound (scenario set-up, settling, queries).
GRACE_S = 120


class WrongAnswers(BenchError):
    """The server answered a query wrongly."""


class Loadgen:
    def __init__(self, binary, seed, log_path):
        self.binary = binary
        self.seed = seed
        self.log_path = log_path

    def run(self, receiver, *flags, bound_s, cpus=None):
        """Runs loadgen against `receiver` with `flags`; `bound_s` is how long it is expected
        to send, which bounds how long it may take in all. `cpus`, when given, is the set of
        CPUs loadgen may run on."""
        argv = [
            self.binary,
            "--udp",
            receiver.udp,
            "--http",
            receiver.http_address,
            "--seed",
            str(self.seed),
            "--json",
            *[str(flag) for flag in flags],
        ]
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            try:
                done = subprocess.run(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    timeout=bound_s + GRACE_S,
                    check=False,
                    preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
                )
            except subprocess.TimeoutExpired as timeout:
                raise BenchError(f"loadgen took longer than {timeout.timeout:.0f} s: {argv}")
        output = done.stdout.decode("utf-8", "replace").strip()
        if done.returncode == 1:
            raise WrongAnswers(
                f"the server answered wrongly (loadgen exit 1); see {self.log_path}: {output}"
            )
        if done.returncode != 0:
            raise BenchError(
                f"loadgen failed (exit {done.returncode}); see {self.log_path}: "
                + " ".join(argv)
            )
        try:
            return json.loads(output.splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise BenchError(f"loadgen printed no JSON summary: {output[:200]!r}")
