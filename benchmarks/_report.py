"""Results of the benchmark scripts: a JSON file rewritten after every update, its markdown twin, console tables.

A results file holds ``meta`` (environment) and named ``sections``; each section has ``tables`` (what is
printed), ``records`` (raw numbers), ``skipped`` (what did not run, and why), ``errors`` and ``notes``.  Several
scripts can write their sections into one file (``--json benchmarks/results/cpu-<date>.json``): existing sections
of other names are kept.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import threading
import traceback
from pathlib import Path


def default_results_name(slug: str) -> str:
    return f"{slug}-{datetime.date.today().isoformat()}"


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def add_row(table: dict, row: list) -> None:
    """Appends ``row`` (raw values, formatted here) to ``table``."""
    if len(row) != len(table["columns"]):
        raise ValueError(f"table {table['title']!r}: a row has {len(row)} cells for {len(table['columns'])} "
                         f"columns: {row}")
    table["rows"].append([_cell(value) for value in row])


def make_table(title: str, columns: list[str], rows: list[list], notes: list[str] | None = None) -> dict:
    table = {"title": title, "columns": list(columns), "rows": [], "notes": list(notes or [])}
    for row in rows:
        add_row(table, row)
    return table


def render_table(table: dict) -> str:
    lines = [f"### {table['title']}", ""]
    lines.append("| " + " | ".join(table["columns"]) + " |")
    lines.append("|" + "|".join(" --- " for _ in table["columns"]) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    lines += [""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def render_section(name: str, section: dict) -> str:
    parts = [f"## {name}", ""]
    parts += [f"- {note}" for note in section.get("notes", [])]
    if section.get("notes"):
        parts.append("")
    parts += [render_table(table) for table in section.get("tables", [])]
    for entry in section.get("skipped", []):
        parts.append(f"- skipped {entry['what']}: {entry['why']}")
    for entry in section.get("errors", []):
        parts.append(f"- ERROR in {entry['what']}: {entry['error']}")
    return "\n".join(parts).rstrip() + "\n"


def render_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    header = ["# Benchmark results", ""]
    header += [f"- {key}: {value}" for key, value in meta.items()]
    if results.get("summary"):
        header += ["", "## summary", ""] + [f"- {line}" for line in results["summary"]]
    body = [render_section(name, section) for name, section in results.get("sections", {}).items()]
    return "\n".join(header) + "\n\n" + "\n".join(body)


class Results:
    """Sections of results kept in memory and, when ``path`` is given, written to ``path`` (+ ``.md``) on flush."""

    def __init__(self, path: str | os.PathLike | None, meta: dict):
        self.path = Path(path) if path is not None else None
        self.data = {"meta": dict(meta), "sections": {}}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
                self.data["sections"].update(previous.get("sections", {}))
            except (OSError, ValueError):  # an unreadable old file is replaced, not merged
                pass

    def section(self, name: str) -> dict:
        """A fresh section named ``name`` (replacing one of that name from an earlier run)."""
        section = {"status": "running", "notes": [], "tables": [], "records": [], "skipped": [], "errors": []}
        self.data["sections"][name] = section
        return section

    @staticmethod
    def skip(section: dict, what: str, why: str) -> None:
        section["skipped"].append({"what": what, "why": why})

    @staticmethod
    def error(section: dict, what: str, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        section["errors"].append({"what": what, "error": detail[:2000]})

    def flush(self) -> None:
        """Writes the JSON (atomically) and the markdown; a section mutated meanwhile by another thread is
        retried on the next flush."""
        if self.path is None:
            return
        with self._lock:
            try:
                text = json.dumps(self.data, indent=1, default=str)
            except RuntimeError:  # "dictionary changed size during iteration": another thread is writing
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(self.path.suffix + ".tmp")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.path)
            self.path.with_suffix(".md").write_text(render_markdown(json.loads(text)), encoding="utf-8")


def print_section(name: str, section: dict) -> None:
    print(render_section(name, section), flush=True)
