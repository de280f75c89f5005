"""Checks a Prometheus text exposition the way `promtool check metrics` does, twice:

- `strict_problems(text)`: a strict parser of the text format 0.0.4 written here (every sample
  under its family's TYPE, one TYPE and HELP per family, no duplicate series, valid names,
  labels and values, histogram buckets cumulative with +Inf equal to _count) plus promtool's
  lint rules (counters end in `_total`, nothing else does, snake_case, base units, no type in
  the name) and this project's own (no precomputed ratio or rate gauges). Always available.
- `promtool_problems(text)`: the real promtool, when one can be had: `promtool` on PATH,
  $PAGEMESH_PROMTOOL, or the one in Debian's `prometheus` package, downloaded once with
  `apt-get download` into the cache directory (the registry the machines reach). None when
  there is none.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+-?\d+)?$")
LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\["\\n])*)"\s*(,|$)')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
NON_BASE_UNITS = ("milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "days")
NON_BASE_UNITS += ("kilobytes", "megabytes", "gigabytes", "percent")
RATIO_WORDS = ("hit_rate", "_ratio", "_percent", "_fraction")


def _labels(raw: str | None) -> tuple[tuple[str, str], ...] | None:
    if not raw:
        return ()
    body = raw[1:-1]
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        m = LABEL_PAIR.match(body, pos)
        if m is None:
            return None
        pairs.append((m.group(1), m.group(2)))
        pos = m.end()
    return tuple(pairs)


def _value(text: str) -> float | None:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    try:
        return float(text)
    except ValueError:
        return None


def _family_of(sample: str, mtype: str, family: str) -> bool:
    if sample == family:
        return mtype in ("counter", "gauge", "untyped", "summary")
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    return any(sample == family + s for s in suffixes.get(mtype, ()))


def strict_problems(text: str) -> list[str]:
    problems: list[str] = []
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    family: str | None = None
    closed: set[str] = set()  # families whose samples ended: they may not come back
    buckets: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    if text and not text.endswith("\n"):
        problems.append("the exposition does not end with a newline")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.match(name):
                    problems.append(f"line {n}: invalid metric name {name!r}")
                if parts[1] == "TYPE":
                    mtype = parts[3].strip() if len(parts) > 3 else ""
                    if mtype not in TYPES:
                        problems.append(f"line {n}: unknown type {mtype!r}")
                    if name in types:
                        problems.append(f"line {n}: second TYPE for {name}")
                    types[name] = mtype
                else:
                    if name in helps:
                        problems.append(f"line {n}: second HELP for {name}")
                    helps.add(name)
                    if len(parts) < 4 or not parts[3].strip():
                        problems.append(f"{name}: no help text")
                if family is not None and family != name:
                    closed.add(family)
                family = name
            continue
        m = SAMPLE.match(line)
        if m is None:
            problems.append(f"line {n}: not a sample: {line!r}")
            continue
        name, raw_labels, raw_value = m.group(1), m.group(2), m.group(3)
        labels = _labels(raw_labels)
        value = _value(raw_value)
        if labels is None:
            problems.append(f"line {n}: malformed labels {raw_labels!r}")
            continue
        if value is None:
            problems.append(f"line {n}: value {raw_value!r} is not a number")
            continue
        if len({k for k, _ in labels}) != len(labels):
            problems.append(f"line {n}: a label repeats")
        owner = family if family is not None and family in types else None
        if owner is None or not _family_of(name, types[owner], owner):
            problems.append(f"line {n}: sample {name} is not under its family's TYPE line")
            continue
        if owner in closed:
            problems.append(f"line {n}: family {owner} appears twice")
        key = (name, labels)
        if key in seen_series:
            problems.append(f"line {n}: duplicate series {name}{raw_labels or ''}")
        seen_series.add(key)
        mtype = types[owner]
        if mtype == "counter" and (value < 0 or math.isnan(value)):
            problems.append(f"line {n}: counter {name} is {value}")
        if mtype == "histogram":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            if name.endswith("_bucket"):
                le = dict(labels).get("le")
                bound = _value(le) if le is not None else None
                if bound is None:
                    problems.append(f"line {n}: bucket without a valid le")
                else:
                    buckets.setdefault((owner, rest), []).append((bound, value))
            elif name.endswith("_count"):
                counts[(owner, rest)] = value
    for (owner, rest), rows in buckets.items():
        if rows != sorted(rows) or any(b[1] > a[1] for a, b in zip(rows[1:], rows, strict=False)):
            problems.append(f"{owner}{dict(rest)}: buckets not cumulative or not in order")
        if not rows or rows[-1][0] != math.inf:
            problems.append(f"{owner}{dict(rest)}: no +Inf bucket")
        elif counts.get((owner, rest)) != rows[-1][1]:
            problems.append(f"{owner}{dict(rest)}: _count differs from the +Inf bucket")
    problems += lint_names(types)
    return problems


def lint_names(types: dict[str, str]) -> list[str]:
    """promtool's lint rules over family names and types, plus no precomputed ratios."""
    problems = []
    for name, mtype in types.items():
        if mtype == "counter" and not name.endswith("_total"):
            problems.append(f'{name}: counter metrics should have "_total" suffix')
        if mtype != "counter" and name.endswith("_total"):
            problems.append(f'{name}: non-counter metrics should not have "_total" suffix')
        if re.search(r"[a-z][A-Z]", name):
            problems.append(f"{name}: metric names should be written in snake_case")
        if any(f"_{u}" in name for u in NON_BASE_UNITS):
            problems.append(f"{name}: use base units (seconds, bytes)")
        for word in ("counter", "gauge", "histogram", "summary"):
            if f"_{word}" in name:
                problems.append(f"{name}: metric names should not include the type {word!r}")
        if any(w in name for w in RATIO_WORDS):
            problems.append(f"{name}: a precomputed ratio: export counters, divide in PromQL")
    return problems


def find_promtool() -> str | None:
    """A promtool binary, fetched once from Debian's prometheus package when none is here."""
    for candidate in (os.environ.get("PAGEMESH_PROMTOOL"), shutil.which("promtool")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    root = os.environ.get("PAGEMESH_CACHE_DIR") or str(Path.home() / ".cache" / "pagemesh")
    cached = Path(root).expanduser() / "tools" / "promtool"
    if cached.is_file():
        return str(cached)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["apt-get", "download", "prometheus"],
                cwd=tmp,
                capture_output=True,
                timeout=300,
                check=True,
            )
            deb = next(Path(tmp).glob("prometheus_*.deb"))
            subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")],
                capture_output=True,
                timeout=120,
                check=True,
            )
        except (subprocess.SubprocessError, OSError, StopIteration):
            return None
        binary = Path(tmp) / "x" / "usr" / "bin" / "promtool"
        if not binary.is_file():
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}")
        shutil.copy2(binary, part)
        part.replace(cached)
    return str(cached)


def promtool_problems(text: str) -> list[str] | None:
    """`promtool check metrics` over `text`: its complaints ([] when clean), or None when no
    promtool could be had."""
    promtool = find_promtool()
    if promtool is None:
        return None
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    out = (result.stdout + result.stderr).decode().strip()
    if result.returncode == 0:
        return []
    return out.splitlines() or [f"promtool exited with {result.returncode}"]
