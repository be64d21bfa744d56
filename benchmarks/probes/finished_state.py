"""A finished run's last state on its own task and model, for the probes that score it.

The run folder is only read (:func:`glora.federation.results.open_run` and its checkpoint.pt):
the task and the model are loaded by a fresh run of the same config begun in a scratch folder,
which is deleted at once, so probing a run never rewrites its evidence, as
``Federation.begin(resume=True)`` on the folder itself would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from glora.federation.engine import ServerState
from glora.federation.results import RunStore, SavedRun, open_run
from glora.federation.simulation import Federation


def last_state(folder: str | Path) -> tuple[SavedRun, Federation, ServerState]:
    """The run in ``folder`` as read, a Federation of its config on one torch thread (task,
    client partition and model loaded), and the run's last checkpointed state on that model.
    Exits naming the folder where it kept no checkpoint.pt."""
    run = open_run(folder)
    if run.checkpoint is None:
        raise SystemExit(
            f"{run.folder} keeps no checkpoint.pt (the run folders under results/ keep none): make the run "
            "again with the command in its meta.json and probe that folder"
        )
    with tempfile.TemporaryDirectory(prefix="glora-probe-") as scratch:
        fed = Federation(run.config.replace(threads=1), Path(scratch), progress=False)
        fed.begin()  # loads the task and the model; writes only in the scratch folder
    st = RunStore(run.folder).load_checkpoint()["state"]
    if st.base_offsets is not None:  # what the run had merged into the base weights
        fed.model.set_base_offsets(st.base_offsets)
    return run, fed, st
