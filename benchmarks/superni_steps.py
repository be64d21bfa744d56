"""The SuperNI training defaults, probed: the cost of a local step on real batches, and
whether a few steps at a learning rate lower the loss on instances not trained on.

    python benchmarks/superni_steps.py [--lrs 5e-4,2e-3] [--steps 10] [--threads 1]

Builds the default SuperNI task (10 clients, one training task each, batch 4 x up to 256
tokens), then for each learning rate: resets a rank-8 adapter, trains three clients' tasks
one after another for ``--steps`` steps each on all but their last 16 instances, and
reports the loss on those 16 instances of each task before and after (teacher-forced, loss
on the output tokens), with the median wall and process-CPU seconds of a step. On a shared
machine the wall time depends on the load; with --threads 1 the CPU time is what a free
core would take.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from glora.federation.client import local_train
from glora.federation.config import RunConfig
from glora.models.lora import AdaptedModel
from glora.tasks.superni import SuperNITask

HELD = 16
CLIENTS = (0, 3, 7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="5e-4,2e-3")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig.for_task("superni", threads=args.threads, superni_eval_tasks=1, superni_eval_instances=1)
    task = SuperNITask(cfg)
    model = AdaptedModel(task.model, task.lora, [8])
    init = model.get_factors(8)

    @torch.no_grad()
    def held_out_loss() -> float:
        model.peft.eval()
        losses = []
        for c in CLIENTS:
            idx = task.parts[c][-HELD:]
            losses += [float(model.peft(**task.batch(idx[s : s + 8])).loss) for s in range(0, HELD, 8)]
        return float(np.mean(losses))

    for lr in (float(x) for x in args.lrs.split(",")):
        model.set_factors(8, init)
        before = held_out_loss()
        params = model.activate(8)
        wall, cpu = [time.perf_counter()], [time.process_time()]

        def tick(wall: list[float] = wall, cpu: list[float] = cpu) -> None:
            wall.append(time.perf_counter())
            cpu.append(time.process_time())

        for c in CLIENTS:
            # Each step after the first of a client is timed from the previous one.
            local_train(model.peft, params, [], task.batch, task.parts[c][:-HELD], args.steps, 4, lr, lr, 0.0, c, tick)
        print(
            f"lr {lr:g}: held-out loss {before:.3f} -> {held_out_loss():.3f}; step {np.median(np.diff(wall)):.2f} s "
            f"wall, {np.median(np.diff(cpu)):.2f} s CPU; tasks {[task.client_tasks[c][0] for c in CLIENTS]}",
            flush=True,
        )
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
