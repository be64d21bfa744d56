"""Your own data: the task registry (a toy task runs through the loop), reading files into
reproducible splits, the natural partition, every bad input as one clear error before
training, and the shipped examples end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from glora import tasks
from glora.data.dataset_files import read_splits
from glora.data.partition import natural_partition
from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.federation.results import RunStore
from glora.federation.simulation import Federation, run_federation
from glora.models.export import ExportInfo
from glora.models.lora import LoraSettings
from glora.tasks.base import TaskFamily

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "data" / "support_tickets.csv"
INSTRUCTIONS = ROOT / "examples" / "data" / "instructions.jsonl"
OWN = RunConfig(
    task="classification",
    dataset=str(TICKETS),
    text_column="text",
    label_column="label",
    clients=4,
    ranks="2,4",
    rounds=1,
    local_steps=3,
    batch_size=16,
    min_client_examples=10,
    threads=1,
)


class ToyTask(TaskFamily):
    """A task registered by a test: random tokens, the label is the parity of the first one."""

    name = "toy"
    main_metric = "accuracy"
    defaults: ClassVar[dict] = {"target_modules": ("query", "value"), "pooling": "cls"}

    def __init__(self, cfg: RunConfig) -> None:
        torch.manual_seed(cfg.seed)
        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
        self.model = BertForSequenceClassification(config).eval()
        self.lora = LoraSettings(("query", "value"), head_modules=("classifier",))
        self.ids = torch.randint(0, 50, (64, 6), generator=torch.Generator().manual_seed(cfg.seed))
        self.labels = self.ids[:, 0] % 2
        self.num_train = 48
        self.cfg = cfg

    def partition(self):
        return [np.arange(i, 48, self.cfg.clients) for i in range(self.cfg.clients)]

    def batch(self, indices):
        idx = torch.as_tensor(indices)
        return {
            "input_ids": self.ids[idx],
            "attention_mask": torch.ones_like(self.ids[idx]),
            "labels": self.labels[idx],
        }

    def evaluate(self, model):
        with torch.no_grad():
            logits = model(input_ids=self.ids[48:], attention_mask=torch.ones_like(self.ids[48:])).logits
        return {"accuracy": float((logits.argmax(-1) == self.labels[48:]).float().mean())}

    def log_label_prior(self, indices):
        raise ValueError("not used")

    def fresh_model(self):
        return ToyTask(self.cfg).model

    @property
    def export_info(self):
        return ExportInfo("toy", "SEQ_CLS", 2)


def test_a_registered_toy_task_runs_through_the_loop(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)
    cfg = RunConfig.for_task(
        "toy", clients=2, ranks="2", rounds=2, local_steps=2, batch_size=8, eval_every=1, threads=1
    )
    assert cfg.target_modules == ("query", "value")  # the family's defaults apply
    summary = run_federation(cfg, tmp_path / "run", progress=False)
    assert summary["rounds"] == 2 and summary["main_metric"] == "accuracy"
    assert [r["round"] for r in RunStore(tmp_path / "run").metrics()] == [1, 2]
    assert (
        json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "toy"
    )


def test_no_task_name_branch_in_the_loop_or_the_flower_app():
    for folder in ("federation", "flower"):
        for path in (ROOT / "src" / "glora" / folder).glob("*.py"):
            text = path.read_text()
            assert 'task == "' not in text and "task == '" not in text, path


def test_committed_runs_keep_their_identity():
    """Every finished run committed under results/ (GLUE, SuperNI, every preset) resolves to
    the identity it was saved with: it resumes, and sweeps skip it."""
    configs = [json.loads(p.read_text()) for p in (ROOT / "results").rglob("config.json")]
    configs = [c for c in configs if "identity" in c]
    assert len(configs) > 500
    changed = [c["identity"] for c in configs if RunConfig.from_saved(c).identity() != c["identity"]]
    assert not changed


def test_a_single_file_splits_the_same_way_every_time(tmp_path):
    a = read_splits(str(TICKETS), 0.1)
    b = read_splits(str(TICKETS), 0.1)
    assert a.validation == b.validation and len(a.validation) == 36 and len(a.train) == 324
    assert not {r["text"] + r["customer"] for r in a.validation} <= {r["text"] + r["customer"] for r in a.train}
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(gzip.compress(TICKETS.read_bytes()))
    assert read_splits(str(gz), 0.1).validation == a.validation  # gzip reads the same rows
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a.train))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a.validation))
    c = read_splits(str(folder))
    assert c.train == a.train and c.validation == a.validation


def test_natural_partition_gives_each_value_to_one_client():
    groups = np.array(["a", "b", "c", "a", "d", "b", "e", "c"])
    parts = natural_partition(groups, 3, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(8))
    for p in parts:
        for q in parts:
            if p is not q:
                assert not set(groups[p]) & set(groups[q])
    assert [len(set(groups[p])) for p in natural_partition(groups, 5, seed=0)] == [1] * 5
    with pytest.raises(ValueError, match="5 distinct values for 6 clients"):
        natural_partition(groups, 6, seed=0)


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def bad_inputs(tmp_path: Path):
    """(config, the error's words) for each bad input of the issue."""
    one_class = _write(tmp_path, "one.csv", "text,label\n" + "".join(f"row {i},x\n" for i in range(40)))
    empty_text = _write(
        tmp_path, "empty.csv", "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)) + ",1\n"
    )
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    (unseen / "train.csv").write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(40)))
    (unseen / "validation.csv").write_text("text,label\nrow,a\nrow,c\n")
    return [
        (OWN.replace(dataset=str(tmp_path / "missing.csv")), "no such file or folder"),
        (OWN.replace(dataset=_write(tmp_path, "data.xlsx", "x")), "unknown file type '.xlsx'"),
        (
            OWN.replace(text_column="body"),
            "--text-column 'body': no such column .* its columns are text, label, customer",
        ),
        (OWN.replace(dataset=empty_text), "column 'text' is empty"),
        (OWN.replace(dataset=one_class), "has one class"),
        (OWN.replace(clients=40), "324 training rows for 40 clients of at least 10"),
        (OWN.replace(partition_column="customer", clients=13), "12 distinct values for 13 clients"),
        (OWN.replace(dataset="someone/their-dataset"), "not a local file or folder, and the hub is off"),
        (OWN.replace(dataset=str(unseen)), "label 'c' does not occur in the training split"),
        (OWN.replace(label_column=""), "needs --label-column"),
        (OWN.replace(metric="bleu"), "--metric 'bleu'"),
    ]


def test_every_bad_input_is_one_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = []
    monkeypatch.setattr("glora.federation.client.local_train", lambda *a, **k: trained.append(1))
    for cfg, words in bad_inputs(tmp_path):
        with pytest.raises(ValueError, match=words):
            check_config(cfg)
            Federation(cfg, tmp_path / "run", progress=False).begin()
    assert not trained


@pytest.mark.slow
def test_three_string_labels_run_resume_and_export_their_names(tmp_path):
    summary = run_federation(OWN.replace(partition_column="customer"), tmp_path / "run", progress=False)
    assert set(summary["final"]) == {"accuracy", "f1_macro"}
    labels = json.loads((tmp_path / "run" / "adapter" / "labels.json").read_text())
    assert labels == {"num_labels": 3, "id2label": {"0": "account", "1": "billing", "2": "technical"}}
    again = run_federation(OWN.replace(partition_column="customer"), tmp_path / "run", resume=True, progress=False)
    assert again["final"] == summary["final"]


@pytest.mark.slow
def test_instruction_jsonl_trains_and_scores_by_rouge(tmp_path):
    cfg = RunConfig.for_task(
        "instructions",
        dataset=str(INSTRUCTIONS),
        prompt_column="instruction",
        input_column="input",
        response_column="output",
        partition_column="category",
        clients=2,
        ranks="4",
        rounds=1,
        local_steps=2,
        max_eval_examples=6,
        threads=1,
    )
    summary = run_federation(cfg, tmp_path / "run", progress=False)
    assert summary["main_metric"] == "rougeL" and 0 <= summary["final"]["rougeL"] <= 100
    assert "exact_match" in summary["final"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (
        adapter["task_type"] == "CAUSAL_LM"
        and adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
