"""The loss plot: loss % against offered rate, one series per receiver, as SVG.

matplotlib draws it when it can be imported (Debian's `python3-matplotlib` package, for the
system `python3`; nothing is installed at run time); otherwise a plain SVG is written by hand,
so that the benchmark never fails for want of a plotting library.
"""

import importlib
import math

# The loss the search accepts, drawn as a line: 99.99% of datagrams must arrive.
THRESHOLD_PERCENT = 0.01

COLOURS = {"ipevents": "#1f77b4", "discard": "#d62728"}


def write_loss_plot(path, series, log):
    """Writes `series` to `path`: {receiver: [run, ...]}, each run a list of
    (offered_per_s, loss_percent) trials. Returns what drew it."""
    pyplot = _matplotlib(log)
    if pyplot is not None:
        _draw_with_matplotlib(pyplot, path, series)
        return "matplotlib"
    with open(path, "w", encoding="utf-8") as svg:
        svg.write(hand_drawn_svg(series))
    return "a hand-written SVG (matplotlib unavailable)"


def _matplotlib(log):
    """matplotlib's pyplot with a file-only backend, or None when matplotlib is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        log("matplotlib is missing (apt-get install python3-matplotlib): drawing a plain SVG")
        return None


def _draw_with_matplotlib(pyplot, path, series):
    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    for name, runs in series.items():
        for index, trials in enumerate(runs):
            trials = sorted(trials)
            axes.plot(
                [offered for offered, _ in trials],
                [loss for _, loss in trials],
                "o-", label=name if index == 0 else None, color=COLOURS.get(name), alpha=0.7,
            )
    axes.axhline(THRESHOLD_PERCENT, color="grey", linestyle="--", linewidth=1,
                 label=f"{THRESHOLD_PERCENT}% (the search's limit)")
    axes.set_xscale("log")
    # Linear near zero, so that lossless trials show at 0, logarithmic above.
    axes.set_yscale("symlog", linthresh=THRESHOLD_PERCENT)
    highest = max((loss for runs in series.values() for trials in runs for _, loss in trials),
                  default=0)
    axes.set_ylim(bottom=0, top=max(1.0, highest * 2))
    axes.set_xlabel("offered rate (datagrams/s)")
    axes.set_ylabel("loss (%)")
    axes.set_title("Loss against offered rate (every trial of every run)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="svg")
    pyplot.close(figure)


def _symlog(loss_percent):
    """The same y scale as matplotlib's symlog: linear below the threshold, log above."""
    ratio = loss_percent / THRESHOLD_PERCENT
    return ratio if ratio <= 1 else 1 + math.log10(ratio)


def _rate_label(rate):
    return f"{rate / 1e6:g}M" if rate >= 1e6 else f"{rate / 1e3:g}k"


def hand_drawn_svg(series, width=800, height=450):
    """A plain SVG line plot with log x and symlog y axes, one line per run."""
    margin_left, margin_right, margin_top, margin_bottom = 70, 20, 30, 50
    points = [point for runs in series.values() for trials in runs for point in trials]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"/>\n'
    x_low = math.log10(min(offered for offered, _ in points)) - 0.05
    x_high = math.log10(max(offered for offered, _ in points)) + 0.05
    y_high = max(_symlog(max(loss for _, loss in points)), 1.5)
    plot_width = width - margin_left - margin_right
    plot_height = height - margin_top - margin_bottom

    def x_of(offered):
        span = max(x_high - x_low, 1e-9)
        return margin_left + (math.log10(offered) - x_low) / span * plot_width

    def y_of(loss):
        return margin_top + plot_height * (1 - _symlog(loss) / y_high)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle">Loss against offered rate '
        "(every trial of every run)</text>",
        f'<line x1="{margin_left}" y1="{margin_top + plot_height}" x2="{width - margin_right}" '
        f'y2="{margin_top + plot_height}" stroke="black"/>',
        f'<line x1="{margin_left}" y1="{margin_top}" x2="{margin_left}" '
        f'y2="{margin_top + plot_height}" stroke="black"/>',
    ]
    for exponent in range(math.floor(x_low), math.ceil(x_high) + 1):
        for mantissa in (1, 2, 5):
            rate = mantissa * 10 ** exponent
            if x_low <= math.log10(rate) <= x_high:
                out.append(f'<text x="{x_of(rate):.1f}" y="{height - 30}" '
                           f'text-anchor="middle">{_rate_label(rate)}</text>')
    for loss in (0, THRESHOLD_PERCENT, 0.1, 1, 10, 100):
        if _symlog(loss) <= y_high:
            out.append(f'<text x="{margin_left - 6}" y="{y_of(loss) + 4:.1f}" '
                       f'text-anchor="end">{loss:g}%</text>')
    threshold_y = y_of(THRESHOLD_PERCENT)
    out.append(f'<line x1="{margin_left}" y1="{threshold_y:.1f}" x2="{width - margin_right}" '
               f'y2="{threshold_y:.1f}" stroke="grey" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">'
               "offered rate (datagrams/s)</text>")
    for index, (name, runs) in enumerate(series.items()):
        colour = COLOURS.get(name, "black")
        for trials in runs:
            coordinates = [(x_of(offered), y_of(loss)) for offered, loss in sorted(trials)]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                    for x, y in coordinates]
        out.append(f'<text x="{width - margin_right - 10}" y="{margin_top + 16 * (index + 1)}" '
                   f'text-anchor="end" fill="{colour}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
