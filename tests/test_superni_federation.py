"""Federated instruction tuning on SuperNI: the task lists of a run, the refusals, and a tiny
end-to-end run (and the zero-shot reference) on the real SmolLM2 backbone and real tasks."""

from __future__ import annotations

import json

import pytest
import torch

from glora.data.superni import SuperNI
from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.federation.simulation import Federation
from glora.models.lora import LoraSettings
from glora.tasks.superni import SuperNITask, task_lists

# 2 clients with one training task each, 1 round of 2 steps, then 2 unseen tasks x 3
# instances and 1 held-out instance of each client task: every path, at minimal cost.
TINY = RunConfig.for_task(
    "superni",
    rule="glora",
    clients=2,
    ranks="2,4",
    rounds=1,
    local_steps=2,
    batch_size=2,
    max_length=128,
    superni_num_examples=1,
    superni_max_target_length=16,
    superni_max_new_tokens=8,
    superni_eval_tasks=2,
    superni_eval_instances=3,
    superni_seen_instances=1,
    eval_batch_size=8,
    threads=1,
)


@pytest.fixture(scope="module")
def data():
    return SuperNI()


def test_superni_defaults_follow_the_task():
    cfg = RunConfig.for_task("superni")
    assert (cfg.backbone, cfg.target_modules, cfg.alpha) == ("smollm2", ("q_proj", "v_proj"), None)
    assert cfg.eval_every == cfg.rounds  # evaluate at the end only
    assert RunConfig.for_task("superni", rounds=7).eval_every == 7
    assert RunConfig.for_task("superni", rounds=7, eval_every=2).eval_every == 2
    assert RunConfig.for_task("superni", rounds=0).eval_every == 1
    glue = RunConfig.for_task("sst2")
    assert (glue.backbone, glue.eval_every) == (RunConfig().backbone, RunConfig().eval_every)
    # peft takes "all-linear" only as a plain string.
    assert LoraSettings(("all-linear",), head_modules=()).config(4).target_modules == "all-linear"


@pytest.mark.parametrize(
    "values",
    [
        {"clients": 10},
        {"clients": 20, "superni_tasks_per_client": 3},
        {"clients": 6, "superni_by_category": True},
        {"clients": 10, "superni_eval_tasks": None},
    ],
)
def test_train_and_test_tasks_never_overlap(data, values):
    for seed in range(3):
        clients, unseen = task_lists(RunConfig.for_task("superni", seed=seed, **values), data)
        trained = [t for tasks in clients for t in tasks]
        assert len(trained) == len(set(trained))  # no task on two clients
        assert not set(trained) & set(unseen)
        assert set(trained) <= set(data.train_tasks) and set(unseen) <= set(data.test_tasks)
        assert len(clients) == values["clients"]


def test_leakage_and_unknown_tasks_are_refused_before_loading(data, tmp_path):
    test_task = data.test_tasks[0]
    train_task = data.train_tasks[0]
    # A test task named as a training task, and a training task named as an unseen task.
    for i, values in enumerate(
        ({"superni_train_tasks": f"{data.train_tasks[1]},{test_task}"}, {"superni_test_tasks": train_task})
    ):
        leaked = test_task if i == 0 else train_task
        with pytest.raises(ValueError, match=rf"task {leaked} .*both a training and a test task"):
            Federation(TINY.replace(**values), tmp_path / str(i), progress=False).run()
        assert not (tmp_path / str(i) / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"unknown SuperNI task 'task_nonsense'"):
        task_lists(TINY.replace(superni_train_tasks="task_nonsense"), data)
    with pytest.raises(ValueError, match=r"--alpha 0\.5 does not apply to superni"):
        check_config(TINY.replace(alpha=0.5))
    with pytest.raises(ValueError, match="--superni-eval-instances must be >= 1"):
        check_config(TINY.replace(superni_eval_instances=0))
    with pytest.raises(ValueError, match=r"--rounds must be >= 0"):
        check_config(TINY.replace(rounds=-1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("superni") / "run"
    fed = Federation(TINY, out, progress=False)
    return fed, fed.run(), out


@pytest.mark.slow
def test_tiny_run_scores_unseen_and_seen_tasks(tiny_run, data):
    fed, summary, out = tiny_run
    task = fed.task
    trained = [t for tasks in task.client_tasks for t in tasks]
    assert len(trained) == 2 and len(task.eval_tasks) == 2
    assert not set(trained) & set(task.eval_tasks)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    ev = rows[0]["eval"]
    categories = {data.task(t).category for t in task.eval_tasks}
    assert {k.removeprefix("unseen/") for k in ev if k.startswith("unseen/")} == set(task.eval_tasks)
    assert {k.removeprefix("category/") for k in ev if k.startswith("category/")} == categories
    assert {k.removeprefix("seen/") for k in ev if k.startswith("seen/")} == set(trained)
    per_task = [ev[f"unseen/{t}"] for t in task.eval_tasks]
    assert ev["rougeL"] == pytest.approx(sum(per_task) / len(per_task))  # the mean over tasks
    scores = [k for k in ev if k.split("/")[0] in ("unseen", "seen", "category", "rougeL", "rougeL_seen")]
    assert len(scores) == 2 + 2 + len(categories) + 2 and all(0.0 <= ev[k] <= 100.0 for k in scores)
    assert len(task.unseen) == 6 and len(task.seen) == 2
    assert ev["skipped/train_instances"] == sum(task.skipped[t] for t in trained)
    assert summary["final"] == ev and summary["main_metric"] == "rougeL"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft asks transformers a deprecated question
def test_tiny_run_exports_a_causal_lm_adapter_peft_reloads(tiny_run):
    from peft import PeftModel

    fed, _, out = tiny_run
    st = fed.store.load_checkpoint()["state"]
    batch = fed.task.batch(fed.task.parts[0][:2])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with fed.model.dense_update({n: s.delta() for n, s in st.layers.items()}, fed.ranks[0], st.head) as m:
        expected = m(**inputs).logits
    loaded = PeftModel.from_pretrained(fed.task.fresh_model(), str(out / "adapter")).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
        base = fed.task.fresh_model()(**inputs).logits
    assert not torch.allclose(base, expected, atol=1e-4)  # training changed the model
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_zero_rounds_evaluates_the_untuned_backbone(tmp_path):
    out = tmp_path / "zero-shot"
    fed = Federation(TINY.replace(rounds=0), out, progress=False)
    summary = fed.run()
    for name in ("config.json", "meta.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "adapter"):
        assert (out / name).exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["train_loss"], r["bytes_up"]) for r in rows] == [(0, None, 0)]
    assert summary["rounds"] == 0 and summary["final"] == rows[0]["eval"]
    assert rows[0]["eval"] == fed.task.evaluate(fed.task.fresh_model())


@pytest.mark.slow
def test_tasks_without_a_fitting_input_are_left_out_of_the_draw():
    # At 80 tokens some drawn tasks have no input that fits even without examples.
    task = SuperNITask(TINY.replace(clients=10, max_length=80, superni_eval_tasks=10))
    assert task.tasks_left_out
    drawn = [t for tasks in task.client_tasks for t in tasks]
    assert len(drawn) == 10 and len(task.eval_tasks) == 10
    assert not set(task.tasks_left_out) & (set(drawn) | set(task.eval_tasks))
    assert {x.task for x in task.train} == set(drawn)  # every client task has training data
    assert {x.task for x in task.unseen} == set(task.eval_tasks)  # every unseen task is scored
    assert all(len(p) for p in task.partition())
