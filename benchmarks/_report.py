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


def _table_head(table: dict) -> list[str]:
    return [f"### {table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
            "|" + "|".join(" --- " for _ in table["columns"]) + "|"]


def _row_line(row: list[str]) -> str:
    return "| " + " | ".join(row) + " |"


def render_table(table: dict) -> str:
    lines = _table_head(table) + [_row_line(row) for row in table["rows"]]
    lines += [""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines).rstrip() + "\n"


MAX_LISTED = 4  # skipped items named in one collapsed line


def skipped_lines(skipped: list[dict]) -> list[str]:
    """One line per reason: "- skipped a, b, c: why" (items beyond MAX_LISTED counted, not named)."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry["why"], []).append(entry["what"])
    lines = []
    for why, whats in by_reason.items():
        named = ", ".join(whats[:MAX_LISTED]) + (f" and {len(whats) - MAX_LISTED} more" if len(whats) > MAX_LISTED
                                                 else "")
        lines.append(f"- skipped {named}: {why}")
    return lines


def _notes_lines(notes: list[str]) -> list[str]:
    return [f"- {note}" for note in notes] + ([""] if notes else [])


def _tail_lines(section: dict) -> list[str]:
    return skipped_lines(section.get("skipped", [])) + [f"- ERROR in {entry['what']}: {entry['error']}"
                                                        for entry in section.get("errors", [])]


def render_section(name: str, section: dict) -> str:
    parts = [f"## {name}", ""] + _notes_lines(section.get("notes", []))
    parts += [render_table(table) for table in section.get("tables", [])]
    parts += _tail_lines(section)
    return "\n".join(parts).rstrip() + "\n"


class LivePrinter:
    """Prints a section while it is measured: its heading and notes at the start, every table row as it is added
    (after the table's title and header), and at the end the notes added since, what was skipped and the errors.
    Disabled, it prints nothing (the caller prints the whole section at the end instead)."""

    def __init__(self, name: str, section: dict, enabled: bool = True):
        self.name, self.section, self.enabled = name, section, enabled
        self._notes_printed = 0

    def _print(self, lines: list[str]) -> None:
        if self.enabled and lines:
            print("\n".join(lines), flush=True)

    def start(self) -> None:
        notes = self.section["notes"]
        self._print(["", f"## {self.name}", ""] + [f"- {note}" for note in notes])
        self._notes_printed = len(notes)

    def row(self, table: dict) -> None:
        """Prints the row just added to ``table``."""
        head = _table_head(table) if len(table["rows"]) == 1 else []
        self._print(([""] if head else []) + head + [_row_line(table["rows"][-1])])

    def line(self, text: str) -> None:
        self._print([text])

    def end(self) -> None:
        notes = self.section["notes"][self._notes_printed:]
        self._print([""] + [f"- {note}" for note in notes] + _tail_lines(self.section))


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
