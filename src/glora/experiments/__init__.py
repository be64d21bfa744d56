"""Experiments: grids of runs, running them, reading them back and reporting them.

Each job has its own place, and imports only run downwards (a test checks the graph):

- ``grid/``: what a sweep runs: presets (``grid/presets/*.toml``) and their expansion into
  runs (``preset``), time estimates (``estimate``), learning rates a tuning sweep chose
  (``tuned``);
- ``sweep/``: running a grid into a results folder: ``glora sweep``'s work (``command``),
  the runner and its sweep.json (``runner``), the time left and the dry run (``time_left``);
- ``sweep_results``: a sweep folder read back, and the folder's layout (file names, run
  statuses) that the runner writes and every reader reads;
- ``statistics``: the numbers of a report (means over seeds, paired differences, costs);
- ``render/``: ``glora report``'s markdown and CSV (``report``, ``cells``, ``comparisons``)
  and plots (``plots``), and ``glora table``'s table of run folders (``runs_table``);
- ``tables``: the terminal table at the end of ``glora run``;
- ``replay``: every server rule replayed on a sweep's recorded client updates;
- ``bench/``: the server-cost benchmark of the aggregation rules (``glora bench``);
- ``demo``, ``gauges``: the synthetic demo and the gauge-exactness table.
"""
