"""The federated fine-tuning loop on the real MiniLM backbone and real SST-2 examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glora.federation import client as client_module
from glora.federation import engine
from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.federation.ranks import parse_ranks
from glora.federation.results import RunStore
from glora.federation.simulation import Federation

SMALL = RunConfig(
    task="sst2",
    rule="glora",
    clients=3,
    alpha=0.5,
    min_client_examples=10,
    ranks="2,4,8",
    rounds=2,
    local_steps=6,
    batch_size=16,
    lr=2e-3,
    eval_every=1,
    max_train_examples=300,
    max_eval_examples=96,
    threads=1,
)


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="--alpha must be > 0"):
        check_config(SMALL.replace(alpha=0.0))
    with pytest.raises(ValueError, match="every rank must be a positive integer"):
        check_config(SMALL.replace(ranks="4,0,8"))
    with pytest.raises(ValueError, match="every rank must be a positive integer"):
        check_config(SMALL.replace(ranks="-2"))
    with pytest.raises(ValueError, match=r"rule 'fedit' needs equal client ranks .* gives \[2, 4, 8\]"):
        check_config(SMALL.replace(rule="fedit"))
    with pytest.raises(ValueError, match="unknown rule 'fedavg'; available rules"):
        check_config(SMALL.replace(rule="fedavg"))
    with pytest.raises(ValueError, match="--fraction must be in"):
        check_config(SMALL.replace(fraction=0.0))


def test_rank_specs():
    assert parse_ranks("8", 3) == [8, 8, 8]
    assert parse_ranks("2,4,8,16", 6) == [2, 4, 8, 16, 2, 4]
    skewed = parse_ranks("skewed", 10, seed=1)
    assert sorted(skewed) == [2, 2, 2, 2, 4, 4, 4, 8, 8, 16]
    assert parse_ranks("skewed", 10, seed=1) == skewed


def test_task_errors_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'nonsense'"):
        Federation(SMALL.replace(backbone="nonsense"), tmp_path / "a").run()
    with pytest.raises(ValueError, match=r"unknown GLUE task|unknown task"):
        Federation(SMALL.replace(task="sst3"), tmp_path / "b").run()
    with pytest.raises((ValueError, FileNotFoundError), match=r"train\.jsonl\.gz"):
        Federation(SMALL.replace(data_dir=str(tmp_path / "nowhere")), tmp_path / "c").run()
    with pytest.raises(ValueError, match="more than the 300 training examples"):
        Federation(SMALL.replace(clients=301, min_client_examples=1), tmp_path / "d").run()
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_end_to_end_glora_unequal_ranks_and_peft_export(tmp_path):
    from peft import PeftModel

    from glora.data import glue

    fed = Federation(SMALL, tmp_path / "run", progress=False)
    summary = fed.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # the loss falls
    for r in rows:
        assert 0.0 <= r["eval"]["accuracy"] <= 1.0
        assert set(r["eval_by_rank"]) == {"2", "4", "8"}
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert summary["final"] == rows[-1]["eval"]
    for name in ("config.json", "meta.json", "summary.json", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["git_commit"] and meta["glora_version"]
    assert meta["device"] == "cpu"  # where it trained: a sweep's time estimate compares like with like

    # The exported adapter reloads in peft and reproduces the global model's predictions.
    st = fed.store.load_checkpoint()["state"]
    batch_ids = fed.task.eval.input_ids[:64]
    ids, mask = glue.collate(batch_ids, fed.task.pad_id)
    with fed.model.dense_update({n: s.delta() for n, s in st.layers.items()}, fed.ranks[0], st.head) as m:
        expected = m(input_ids=ids, attention_mask=mask).logits
    base = fed.task.fresh_model()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_clients_receive_exactly_the_readout_and_factors_round_trip(tmp_path, monkeypatch):
    received = []
    original = client_module.local_train

    def spy(model, *args, **kwargs):
        fed = spy.fed
        r = next(r for r in fed.model.ranks if fed.model.peft.active_adapter == f"r{r}")
        received.append((r, fed.model.get_factors(r)))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(client_module, "local_train", spy)
    cfg = SMALL.replace(rounds=2, local_steps=2, eval_every=2)
    fed = Federation(cfg, tmp_path / "run", progress=False)
    spy.fed = fed
    states = []
    original_round = fed._round

    def record_round(st, t, bar):
        out = original_round(st, t, bar)
        states.append(dict(st.layers))
        return out

    fed._round = record_round
    fed.run()
    after_round_1 = states[0]
    round_2 = received[len(received) // 2 :]
    assert {r for r, _ in round_2} == {2, 4, 8}
    for r, factors in round_2:
        scale = fed.model.settings.scale(r)
        for name, f in factors.items():
            expected = after_round_1[name].readout(r, scale)
            assert torch.equal(f.B, expected.B.to(f.B.dtype)) and torch.equal(f.A, expected.A.to(f.A.dtype))
    # Written into the model and read back: identical.
    r, factors = round_2[0]
    fed.model.set_factors(r, factors)
    back = fed.model.get_factors(r)
    assert all(torch.equal(back[n].B, f.B) and torch.equal(back[n].A, f.A) for n, f in factors.items())


@pytest.mark.slow
def test_resume_reaches_the_same_metrics(tmp_path, monkeypatch):
    cfg = SMALL.replace(local_steps=3, rule="flora")  # flora also exercises base-weight merges
    straight = Federation(cfg, tmp_path / "straight", progress=False).run()

    calls = {"n": 0}
    original = Federation._round

    def crash_in_round_2(self, st, t, bar):
        if t == 2 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt("simulated interruption")
        return original(self, st, t, bar)

    monkeypatch.setattr(Federation, "_round", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        Federation(cfg, tmp_path / "resumed", progress=False).run()
    kept = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(kept) == 1  # round 1's metrics and checkpoint survive the crash
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        Federation(cfg, tmp_path / "resumed", progress=False).run()
    resumed = Federation(cfg, tmp_path / "resumed", progress=False).run(resume=True)
    assert resumed["final"] == straight["final"]
    assert resumed["final_by_rank"] == straight["final_by_rank"]
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert [(r["after_round"], r["device"]) for r in meta["resumes"]] == [(1, "cpu")]


@pytest.mark.slow
def test_a_run_begun_again_without_a_checkpoint_records_its_own_start(tmp_path):
    """A folder with a config but no checkpoint (a run cut before its first checkpoint, or
    copied without it from another machine) starts again at round 1: its meta.json must name
    this start, not keep the other machine's, and its old metrics go."""
    cfg = SMALL.replace(rounds=1, local_steps=2)
    out = tmp_path / "run"
    RunStore(out).start(cfg.to_dict(), cfg.identity())
    (out / "meta.json").write_text(json.dumps({"git_commit": "elsewhere", "device": "cuda", "torch": "2.11.0+cu130"}))
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval": {"accuracy": 0.0}}) + "\n")
    Federation(cfg, out, progress=False).run(resume=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["device"] == "cpu" and meta["git_commit"] != "elsewhere" and "resumes" not in meta
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1] and "round_seconds" in rounds[0]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["centralized", "local"])
def test_reference_rules_run(tmp_path, rule):
    cfg = SMALL.replace(rule=rule, rounds=1, local_steps=2)
    summary = Federation(cfg, tmp_path / rule, progress=False).run()
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    if rule == "local":
        assert summary["final_personal"] is not None
        rows = (tmp_path / rule / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[0])["bytes_up"] == 0  # nothing leaves a client
    else:
        assert np.isclose(summary["final"]["accuracy"], summary["final_global"]["accuracy"])


def test_sentence_pairs_get_the_tokenizers_segment_ids():
    from glora.tasks.glue import GlueTask

    task = GlueTask(SMALL.replace(task="mrpc", max_train_examples=40, max_eval_examples=10, alpha=None))
    assert task.segments
    pairs = [("The cat sat.", "A cat was sitting on the mat."), ("Short.", "Also short here, longer.")]
    encoded = [task.tokenizer(a, b) for a, b in pairs]
    got = task.inputs([e["input_ids"] for e in encoded])
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        assert got["token_type_ids"][row, :n].tolist() == e["token_type_ids"]
        assert got["token_type_ids"][row, n:].sum() == 0


@pytest.mark.slow
def test_equal_ranks_are_scored_at_the_rank_clients_receive_where_it_differs(tmp_path):
    """FlexLoRA's state is the mean (rank up to 3 x 4): a rank-4 client receives its truncation,
    which is scored beside the global model. GLoRA at R = 4 sends the global model itself."""
    cfg = SMALL.replace(ranks="4", rounds=1)
    flex = run_federation_rows(cfg.replace(rule="flexlora"), tmp_path / "flex")
    assert set(flex["eval_by_rank"]) == {"4"}  # absent before: equal ranks were scored globally only
    assert "eval_by_rank" not in run_federation_rows(cfg.replace(rule_options={"rank": "max"}), tmp_path / "glora")


def run_federation_rows(cfg, folder):
    """The last metrics row of a run."""
    Federation(cfg, folder, progress=False).run()
    return RunStore(folder).metrics()[-1]


def test_held_out_shares_are_never_trained_on():
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 14)]
    train, held = engine.holdout_split(parts, 0.25, seed=0)
    assert [len(h) for h in held] == [2, 1, 0]  # at least one where a client has two; never its last
    for p, t, h in zip(parts, train, held, strict=True):
        assert not set(t) & set(h) and sorted([*t, *h]) == list(p)
    assert all(np.array_equal(a, b) for a, b in zip(engine.holdout_split(parts, 0.0, seed=0)[0], parts, strict=True))
    assert RunConfig(personal_holdout=0.0).identity() == RunConfig().identity()
    with pytest.raises(ValueError, match="--personal-holdout must be in"):
        check_config(SMALL.replace(personal_holdout=1.0))


@pytest.mark.slow
def test_personal_models_are_scored_on_their_clients_held_out_share(tmp_path, monkeypatch):
    trained = []
    real = client_module.local_train

    def spy(model, lora, head, batch, indices, *args, **kwargs):
        trained.append(set(indices.tolist()))
        return real(model, lora, head, batch, indices, *args, **kwargs)

    monkeypatch.setattr(client_module, "local_train", spy)
    cfg = SMALL.replace(rule="local", ranks="4", rounds=1, local_steps=2, personal_holdout=0.2)
    fed = Federation(cfg, tmp_path / "run", progress=False)
    summary = fed.run()
    held = set(np.concatenate(fed.held).tolist())
    assert held and not held & set().union(*trained)
    assert set(summary["final_heldout_personal"]) == {"accuracy"}
    assert set(summary["final_heldout_global"]) == {"accuracy"}
