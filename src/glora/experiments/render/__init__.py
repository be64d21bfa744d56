"""Rendering: ``glora report``'s report.md and report.csv (``report``, which lays out cells and
tables with ``cells`` and the seed-by-seed sections with ``comparisons``), its PNG plots
(``plots``), and ``glora table``'s markdown table of run folders (``runs_table``)."""
