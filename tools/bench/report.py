"""Figures and their Markdown: a figure is the median of several runs with their min and max;
tables are GitHub Markdown. Also what the report says about the machine. No measuring here.
"""

import platform
import statistics
import subprocess


class Figure:
    """The runs of one measurement: median, min and max, or nothing when none succeeded."""

    def __init__(self, values):
        self.values = [value for value in values if value is not None]

    def __bool__(self):
        return bool(self.values)

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    @property
    def low(self):
        return min(self.values) if self.values else None

    @property
    def high(self):
        return max(self.values) if self.values else None

    def show(self, unit=lambda value: f"{value:.3g}"):
        """`median [min–max]`, or just the value for a single run."""
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return unit(self.median)
        return f"{unit(self.median)} [{unit(self.low)}–{unit(self.high)}]"


def rate(value):
    """Events per second with an SI suffix: 1234567 becomes 1.23M."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def size(value):
    """Bytes with a binary suffix."""
    for factor, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:.0f} B"


def count(value):
    """A whole number with thousands separators."""
    return f"{value:,.0f}"


def ms(value):
    return f"{value:.3g} ms"


def percent(value):
    return f"{value:.3g}%"


def ratio(value):
    return f"{value:.2f}"


def table(headers, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _read(path, default="unknown"):
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:
        return default


def cpu_model():
    for line in _read("/proc/cpuinfo", "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_bytes():
    for line in _read("/proc/meminfo", "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def git_revision(repo):
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine(repo, cores, load_at_start):
    """The machine section: what a reader needs to compare these figures with others."""
    rows = [
        ("CPU", cpu_model()),
        ("cores", str(cores)),
        ("memory", size(memory_bytes())),
        ("kernel", platform.release()),
        ("net.core.rmem_max", _read("/proc/sys/net/core/rmem_max").strip() + " bytes"),
        ("load average at start (1 min)", f"{load_at_start:.2f}"),
        ("revision", git_revision(repo)),
    ]
    return table(["", ""], rows)
