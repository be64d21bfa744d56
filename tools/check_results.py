"""Re-make, from the stored data, every file under results/ that glora renders, into a
temporary folder, and compare its bytes with the file in results/; prints each file as
"same" or "DIFFERENT" (with its first differing line) and exits 1 if any differs.

    .venv/bin/python tools/check_results.py [RESULTS_DIR]      # default: this checkout's results/

What is re-made, by the function the command that made it runs:

- sweep reports: report.md and report.csv of every folder with a sweep.json and a report,
  by ``write_report`` (``glora report``), with the options that made them: plots where the
  folder has plots/ (the report links them), ``--last-evals K`` where the report has its
  "Mean of the last K evaluations" section (sparse-participation and server-rank were made
  with ``--last-evals 2``, results/sweeps/README.md), the defaults otherwise;
- replay reports: report.md of every folder with a rows.jsonl, by ``report_markdown``
  (``glora replay``), under the title the report has (results/replay/README.md);
- the aggregation benchmark: aggregation.json and aggregation.md of every folder with an
  aggregation.json, by the benchmark's ``write_report`` (``glora bench``).

Not compared: PNG plots (matplotlib's bytes change with its version and fonts; they are
drawn into the temporary folder only because the reports link them); tables that READMEs
quote (``glora table`` and the probes' printouts, edited into prose); and files computed
rather than rendered (gauge_exactness.md, superni_defaults.md, the probes' .md files),
which re-making would mean running the computation again.

Nothing is written under RESULTS_DIR: every output goes to the temporary folder.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from glora.experiments.bench.cases import HEADLINE
from glora.experiments.bench.report import write_report as write_bench_report
from glora.experiments.render.report import write_report as write_sweep_report
from glora.experiments.replay import read_rows, report_markdown
from glora.experiments.sweep_results import INDEX

RESULTS = Path(__file__).resolve().parents[1] / "results"


def sweep_reports(results: Path, scratch: Path) -> Iterator[tuple[Path, Path]]:
    """(committed, re-made) for each sweep report."""
    for index in sorted(results.rglob(INDEX)):
        folder = index.parent
        committed = [folder / name for name in ("report.md", "report.csv") if (folder / name).exists()]
        if not committed:
            continue
        found = re.search(r"^## Mean of the last (\d+) evaluations$", _text(folder / "report.md"), re.M)
        out = scratch / folder.relative_to(results)
        write_sweep_report(folder, out, plots=(folder / "plots").is_dir(), last=int(found.group(1)) if found else 1)
        yield from ((path, out / path.name) for path in committed)


def replay_reports(results: Path, scratch: Path) -> Iterator[tuple[Path, Path]]:
    """(committed, re-made) for each replay report."""
    for rows in sorted(results.rglob("rows.jsonl")):
        committed = rows.parent / "report.md"
        if not committed.exists():
            continue
        title = committed.read_text().splitlines()[0].removeprefix("# ")
        made = scratch / committed.relative_to(results)
        made.parent.mkdir(parents=True, exist_ok=True)
        made.write_text(report_markdown(read_rows(rows), title))
        yield committed, made


def bench_reports(results: Path, scratch: Path) -> Iterator[tuple[Path, Path]]:
    """(committed, re-made) for the aggregation benchmark's raw numbers and tables."""
    for raw in sorted(results.rglob("aggregation.json")):
        out = scratch / raw.parent.relative_to(results)
        write_bench_report(json.loads(raw.read_text()), out, HEADLINE)
        for name in ("aggregation.json", "aggregation.md"):
            if (raw.parent / name).exists():
                yield raw.parent / name, out / name


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def first_difference(a: bytes, b: bytes) -> str:
    """Where two files part: the first block of non-blank lines that differs, as each file has
    it (at most two lines each, shortened; "(none)" where the other file only adds lines)."""
    left, right = ([x for x in f.decode(errors="replace").splitlines() if x.strip()] for f in (a, b))
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        if tag != "equal":
            shown = [" // ".join(x[:100] for x in lines[:2]) or "(none)" for lines in (left[i1:i2], right[j1:j2])]
            return f"after {i1} equal non-blank lines:\n    committed: {shown[0]}\n    re-made:   {shown[1]}"
    return "only blank lines, line endings or the final newline differ"


def main() -> int:
    results = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else RESULTS
    differ = 0
    with tempfile.TemporaryDirectory(prefix="check-results-") as tmp:
        scratch = Path(tmp)
        for check in (sweep_reports, replay_reports, bench_reports):
            for committed, made in check(results, scratch):
                old, new = committed.read_bytes(), made.read_bytes()
                name = committed.relative_to(results.parent)
                if old == new:
                    print(f"same       {name}", flush=True)
                else:
                    differ += 1
                    print(f"DIFFERENT  {name}: {first_difference(old, new)}", flush=True)
    print(f"{differ} file(s) differ" if differ else "every re-made file is the same")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
