"""Running a grid into a results folder: ``glora sweep``'s work (``command``), the runner and
the sweep.json it keeps (``runner``), and what is left of a grid, for the dry run and the
progress bars (``time_left``)."""
