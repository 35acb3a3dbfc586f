"""What every benchmark script shares when it reports: the results table's rows, the machine
line, and replacing its own marked section of bench/RESULTS.md without touching the others'."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the results table: a target and what was measured against it."""

    figure: str
    what: str
    target: str
    measured: str
    ok: bool | None  # None: reported, not judged

    @property
    def status(self) -> str:
        return "INFO" if self.ok is None else ("PASS" if self.ok else "FAIL")


@dataclass
class Figure:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def row(self, what: str, target: str, measured: str, ok: bool | None) -> None:
        self.rows.append(Row(self.key, what, target, measured, ok))


def table(rows: list[Row]) -> list[str]:
    out = ["| figure | what | target | measured | result |", "|---|---|---|---|---|"]
    out += [f"| {r.figure} | {r.what} | {r.target} | {r.measured} | **{r.status}** |"
            for r in rows]
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, str]:
    """Cores, CPU, RAM, OS, kernel, Python, load, wrk and the commit measured."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor() or "?")
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines()
                   if ln.startswith("MemTotal:")), 0)
    distro = next((ln.split("=", 1)[1].strip('"') for ln in _read("/etc/os-release").splitlines()
                   if ln.startswith("PRETTY_NAME=")), "?")
    wrk = "absent"
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        wrk = (out.stdout or out.stderr).split("[")[0].strip().removeprefix("wrk ") or "present"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO_ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=REPO_ROOT).stdout.strip()
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram": f"{mem_kb / 2**20:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "os": distro,
        "load": " ".join(_read("/proc/loadavg").split()[:3]),
        "wrk": wrk,
        "commit": f"{commit}{' + uncommitted changes' if dirty else ''}",
    }


def write_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the text between `begin` and `end` (or append it), keeping other sections."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def render(begin: str, end: str, title: str, figures: list[Figure], command: str,
           started: dt.datetime, took: float, tools: str = "") -> str:
    """A benchmark's whole section: header, results table, then each figure's details (lines
    starting with `|` form markdown tables, the others become list items)."""
    m = machine()
    lines = [
        begin,
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}, took {took / 60:.1f} min",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram']} RAM, {m['os']}, kernel "
        f"{m['kernel']}, Python {m['python']}{tools}",
        f"- citadeld: commit {m['commit']}",
        "",
        *table([r for f in figures for r in f.rows]),
        "",
    ]
    for f in figures:
        lines += [f"### {f.key}. {f.title}", ""]
        in_table = False
        for d in f.details:  # markdown tables need blank lines around them
            if d.startswith("|") != in_table:
                in_table = not in_table
                lines.append("")
            lines.append(d if in_table else f"- {d}")
        lines.append("")
    lines.append(end)
    return "\n".join(lines) + "\n"
