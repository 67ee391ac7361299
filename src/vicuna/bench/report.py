"""Benchmark results: rows of (figure, baseline, ratio), the statistics behind them, and the three outputs
(a terminal table, a JSON file, a matplotlib chart of the ratios).

JSON layout (`schema` 1), the same for `latency`, `serve` and `memory`:

    {
      "schema": 1,
      "benchmark": "latency" | "serve" | "memory",
      "created": "2025-01-01T12:00:00+00:00",       # UTC, ISO 8601
      "machine": {"cpu", "cores", "ram_bytes", "gpus": [{"name", "memory_bytes"}], "platform",
                  "python", "torch", "transformers", "load_average_before"},  # 1-minute, at the start
      "settings": {...},                              # what was measured: model, dtype, runs, tokens...
      "rows": [{
          "group": "short prompt (12 tokens)",       # the scenario the row belongs to
          "metric": "decode",                         # what is measured
          "unit": "tok/s",
          "value": 61.2,                              # our figure (median of the runs)
          "baseline": "HF generate",                  # what it is compared with, measured in the same run
          "baseline_value": 30.4,
          "ratio": 2.01,                              # value / baseline_value (null when the baseline is 0)
          "target": 2.0,                              # the issue's target for the ratio, or null
          "target_op": ">=",                          # ">=" or "<=": how the ratio must compare with target
          "met": true                                 # ratio meets target (null without a target)
      }],
      "samples": {...}                                # the raw per-run figures, keyed by what they are
    }
"""

from __future__ import annotations

import io
import json
import math
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from vicuna.errors import VicunaError
from vicuna.weights.disk import is_standard_output, write_atomically

SCHEMA = 1
ROW_KEYS = (
    "group",
    "metric",
    "unit",
    "value",
    "baseline",
    "baseline_value",
    "ratio",
    "target",
    "target_op",
    "met",
)
REPORT_KEYS = ("schema", "benchmark", "created", "machine", "settings", "rows", "samples")
# minor ticks of the chart's log axis are labelled only when it spans at most this many decades
MINOR_LABEL_DECADES = 2.5


def median(values: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline; None when the baseline is zero (nothing to compare with)."""
    return value / baseline if baseline else None


@dataclass(frozen=True)
class Row:
    """One figure beside its baseline. `ratio` is always value / baseline_value, whichever way is better:
    the target's operator says which way the issue wants it."""

    group: str
    metric: str
    unit: str
    value: float
    baseline: str
    baseline_value: float
    target: float | None = None
    target_op: Literal[">=", "<="] = ">="

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.baseline_value)

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.target_op == ">=" else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ROW_KEYS}


@dataclass
class Report:
    benchmark: str
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "benchmark": self.benchmark,
            "created": self.created,
            "machine": self.machine,
            "settings": self.settings,
            "rows": [row.to_dict() for row in self.rows],
            "samples": self.samples,
        }


def model_info(engine: Any, settings: Any) -> dict[str, Any]:
    """The settings every report records about the model it measured."""
    return {
        "model": engine.model_name,
        "model_path": settings.model_path,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "load_8bit": settings.load_8bit,
    }


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch
    import transformers

    from vicuna.engine.memory import probe_hardware

    hw = probe_hardware()
    return {
        "cpu": hw.cpu,
        "cores": hw.cores,
        "ram_bytes": hw.ram_total,
        "gpus": [{"name": g.name, "memory_bytes": g.total_bytes} for g in hw.gpus],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def print_table(report: Report, *, stderr: bool = False) -> None:
    """The rows as a rich table, one section per group; ratios that meet their target in green, those
    that miss it in red, and "met" or "missed" beside the target, which a pipe or a file (no colours)
    keeps."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=stderr)
    m = report.machine
    gpus = ", ".join(g["name"] for g in m.get("gpus", [])) or "no GPU"
    table = Table(
        title=f"vicuna bench {report.benchmark}",
        caption=f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {gpus}; torch {m.get('torch', '?')}"
        + (
            f"; load average {m['load_average_before']} at the start"
            if m.get("load_average_before") is not None
            else ""
        )
        + "\nratio: value / baseline, both measured in this run",
    )
    # words too long for a narrow terminal go on in the column's next row, whole: cut at "…" they left
    # "dec…" and "int…", and columns that could not wrap left none of the room to the metric's name
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("baseline", overflow="fold")
    table.add_column("ratio", justify="right", overflow="fold")
    table.add_column("target", justify="right", overflow="fold")
    group = None
    for row in report.rows:
        if row.group != group:
            if group is not None:
                table.add_section()
            group = row.group
            table.add_row(f"[bold]{group}[/bold]", "", "", "", "")
        style = {True: "green", False: "red", None: ""}[row.met]
        r = f"{_fmt(row.ratio)}x" if row.ratio is not None else "-"
        table.add_row(
            f"  {row.metric}",
            f"{_fmt(row.value)} {row.unit}",
            f"{_fmt(row.baseline_value)} {row.unit} {row.baseline}",
            f"[{style}]{r}[/{style}]" if style else r,
            f"{row.target_op} {row.target:g}x {'met' if row.met else 'missed'}"
            if row.met is not None
            else "",
        )
    console.print(table)


def progress_bar(progress: bool) -> Any:
    """The benchmarks' progress (a rich `Progress`, used as a context manager), on stderr: the table goes
    to stdout, and `vicuna bench latency > table.txt` drew its bar into the file, where rich draws none,
    so minutes passed without a word. On a terminal it is a bar; in a log, and on a dumb terminal (TERM=dumb:
    Emacs' M-x shell, where rich redraws nothing and a screen reader's Emacspeak runs) each step's description
    is a line of its own."""
    from rich.console import Console
    from rich.progress import Progress

    class Steps(Progress):
        said: str | None = None

        def update(self, task_id: Any, *, description: str | None = None, **kwargs: Any) -> None:
            if description not in (None, self.said) and not self.disable and not self.console.is_interactive:
                print(f"{description} ...", file=sys.stderr, flush=True)
                self.said = description
            super().update(task_id, description=description, **kwargs)

    return Steps(console=Console(stderr=True), disable=not progress, transient=True)


def check_reply_fits(engine: Any, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a benchmark's reply that the model's context window cannot hold beside its prompt, naming
    the flag to change."""
    from vicuna.errors import ContextTooLongError

    try:
        engine.check_fits(prompt_tokens, new_tokens)
    except ContextTooLongError as err:
        raise VicunaError(f"{err}: use fewer --new-tokens") from None


def check_output_path(path: Path, *, suffix: str | None = None) -> None:
    """Refuse an output file whose folder does not exist (a mistyped folder is not created, as if asked
    for), is not writable, or that is a folder itself, before the benchmark runs rather than after it;
    with `suffix`, one whose name does not end in it (the file would not be what it is named)."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise VicunaError(f"{path}: the chart is written as {suffix[1:].upper()}; name it *{suffix}")
    if not path.parent.is_dir():
        raise VicunaError(f"{path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise VicunaError(f"{path} is a folder; name the file to write in it")
    if path.exists() and not path.is_file():  # a pipe or a device (`--json /dev/stdout`): written into
        return
    try:  # what writing it will do: a temporary file beside it (os.access says yes to root everywhere)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as err:
        raise VicunaError(f"{path}: cannot write into {path.parent} ({err.strerror or err})") from None


def check_plotting() -> None:
    """Refuse `--plot` before the benchmark where matplotlib cannot draw the chart: not installed, or
    $MPLBACKEND naming no backend (matplotlib reads it on import, even though the chart is drawn with Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except (ImportError, ValueError) as err:
        raise VicunaError(f"--plot: matplotlib cannot draw the chart ({err})") from None


def write_json(report: Report, path: Path) -> None:
    check_output_path(path)
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    write_atomically(Path(path), text)


def minor_tick_label(value: float, decades: float) -> str:
    """The label of a minor tick of the log axis (2x, 3x, ... 9x of a power of ten), or none: on an axis of
    more than `MINOR_LABEL_DECADES` decades they would run into each other and into the powers of ten, so
    there are none; across more than half a decade only 2 and 5 (and 3 within one and a half) are."""
    if decades > MINOR_LABEL_DECADES or value <= 0:
        return ""
    digit = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
    labelled = range(2, 10) if decades <= 0.6 else (2, 3, 5) if decades <= 1.5 else (2, 5)
    return f"{value:g}x" if digit in labelled else ""


def ratio_chart(report: Report) -> Any:
    """The chart `write_plot` saves: a horizontal line per row with a ratio, from 1x to value / baseline,
    the ratio written above its end, the target as a black tick (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in report.rows if r.ratio]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * max(len(rows), 1)))
    y = list(range(len(rows)))
    # Ratios span orders of magnitude (a copy is 100x faster than a conversion): a log axis, a line from 1x.
    for i, r in enumerate(rows):
        color = "tab:green" if r.met else "tab:red" if r.met is False else "tab:blue"
        ax.plot([1, r.ratio], [i, i], color=color, linewidth=3)
        ax.plot([r.ratio], [i], "o", color=color)
        # above the line, clear of the target's tick (7 points each way) even where the two are close
        ax.annotate(f"{r.ratio:.3g}x", (r.ratio, i), xytext=(0, 8), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
        if r.target is not None:
            ax.plot([r.target], [i], "|", color="black", markersize=14, markeredgewidth=2)
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    low, high = ax.get_xlim()
    decades = math.log10(high / low)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: minor_tick_label(v, decades)))
    ax.tick_params(axis="x", which="major", labelsize=8)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_yticks(y, [f"{r.group}: {r.metric}\nvs {r.baseline}" for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("ratio to the baseline, log scale (black tick: target)")
    machine = report.machine.get("cpu", "")
    ax.set_title(f"vicuna bench {report.benchmark} — {machine}", fontsize=9)
    fig.tight_layout()
    return fig


def write_plot(report: Report, path: Path) -> None:
    """`ratio_chart` saved as a PNG file (its name must end in .png)."""
    import matplotlib.pyplot as plt

    check_output_path(path, suffix=".png")
    fig = ratio_chart(report)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_atomically(Path(path), png.getvalue())


def emit(report: Report, *, json_path: Path | None, plot_path: Path | None) -> None:
    """Print the table and write the files asked for. Where the JSON goes to standard output (`--json
    /dev/stdout | jq`), the table goes to stderr: it came before the JSON, which jq then refused."""
    print_table(report, stderr=json_path is not None and is_standard_output(json_path))
    if json_path is not None:
        write_json(report, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_path is not None:
        write_plot(report, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
