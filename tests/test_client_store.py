"""The clients' own states out of memory (issue #33): personalised rules keep each client's
factors and head in a file of the run folder (``clients/<id>-r<round>.pt``) that the
checkpoint names instead of copying, load only the clients a round or an evaluation needs,
resume bit for bit (also from a checkpoint of an older version, which held the states inline,
and from a round cut after its client files were written), and ``--eval-clients N`` scores a
seeded sample of N clients' own models at every evaluation, every client's at the last round.

All on the toy task of tests/test_own_data.py (a one-layer BERT of width 16): a run takes
about a second."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from glora import tasks
from glora.federation.checks import check_config
from glora.federation.client_store import CLIENTS, ClientStore
from glora.federation.config import RunConfig
from glora.federation.engine import ClientState
from glora.federation.evaluation import Evaluation
from glora.federation.results import CHECKPOINT, CLIENT_FILES, RunStore
from glora.federation.simulation import Federation
from tests.test_own_data import ToyTask

TIMING = {"round_seconds", "server_seconds", "peak_rss_mb"}


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)


def toy(**changes) -> RunConfig:
    values = {
        "rule": "fedsa-lora",
        "clients": 5,
        "ranks": "2",
        "rounds": 3,
        "local_steps": 2,
        "batch_size": 8,
        "eval_every": 1,
        "threads": 1,
        **changes,
    }
    return RunConfig.for_task("toy", **values)


def run(cfg: RunConfig, folder: Path) -> dict:
    return Federation(cfg, folder, progress=False).run()


def files(folder: Path) -> dict[int, int]:
    """The store's files as {client: round written}."""
    out = {}
    for p in (folder / CLIENTS).iterdir():
        client, version = p.name.removesuffix(".pt").split("-r")
        out[int(client)] = int(version)
    return out


def rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in RunStore(folder).metrics()]


def assert_same_state(a: Path, b: Path) -> None:
    """The two run folders' last checkpoints hold the same state bit for bit: the rule's layers,
    the head, and every client's own factors and head (read through each one's store)."""
    sa, sb = RunStore(a).load_checkpoint()["state"], RunStore(b).load_checkpoint()["state"]
    assert sa.round == sb.round
    assert set(sa.layers) == set(sb.layers)
    for n in sa.layers:
        assert torch.equal(sa.layers[n].delta(), sb.layers[n].delta()), n
    assert sa.head.keys() == sb.head.keys() and all(torch.equal(sa.head[k], sb.head[k]) for k in sa.head)
    assert list(sa.personal) == list(sb.personal) and len(sa.personal) > 0
    for i in sa.personal:
        pa, pb = sa.personal[i], sb.personal[i]
        assert pa.rank == pb.rank
        for n, f in pa.factors.items():
            assert torch.equal(f.B, pb.factors[n].B) and torch.equal(f.A, pb.factors[n].A), (i, n)
            assert f.scale == pb.factors[n].scale
        assert all(torch.equal(pa.head[k], pb.head[k]) for k in pa.head), i


# -- (a) the checkpoint names the store; one file per client that trained --------------------------
def test_the_checkpoint_names_client_files_and_does_not_grow_with_the_clients(tmp_path):
    few, many = tmp_path / "few", tmp_path / "many"
    run(toy(clients=3, rounds=2), few)
    run(toy(clients=12, rounds=2), many)
    for folder, k in ((few, 3), (many, 12)):
        ckpt = torch.load(folder / CHECKPOINT, weights_only=False)
        assert dict(ckpt["state"].personal) == {}  # no client's tensors in the checkpoint
        assert ckpt[CLIENT_FILES] == {i: 2 for i in range(k)} == files(folder)
    # Twelve clients' checkpoint is as large as three's (a few bytes a client name its file),
    # while the nine more states take nine more files.
    one_client = (many / CLIENTS / "0-r2.pt").stat().st_size
    grown = (many / CHECKPOINT).stat().st_size - (few / CHECKPOINT).stat().st_size
    assert abs(grown) < one_client / 4, (grown, one_client)


def test_the_store_holds_one_file_per_client_that_trained_at_its_last_round(tmp_path):
    folder = tmp_path / "run"
    run(toy(clients=10, fraction=0.2, rounds=4), folder)
    last: dict[int, int] = {}
    for row in RunStore(folder).metrics():
        last.update(dict.fromkeys(row["clients"], row["round"]))
    assert 2 < len(last) < 10  # some clients trained, some never did
    assert files(folder) == last  # older versions deleted, never-sampled clients have none


# -- (b) memory ----------------------------------------------------------------------------------
def test_only_the_rounds_clients_states_are_in_memory(tmp_path, monkeypatch):
    """After each round no client's state is resident (the store holds none in memory, and no
    ClientState object is alive), though the store knows every client that trained; while the
    last evaluation scores every client's own model, at most the round's clients and the one
    being scored are."""
    live = []
    end_round = Federation.end_round
    own_model = Evaluation.own_model

    def alive() -> int:
        gc.collect()
        return sum(type(o) is ClientState for o in gc.get_objects())

    def checked_end_round(self, st, t, record, t_round):
        sampled = len(record["clients"])
        assert st.personal.resident == sampled  # this round's states, not yet written
        end_round(self, st, t, record, t_round)
        assert st.personal.resident == 0
        live.append((t, alive(), len(st.personal)))

    def counted_own_model(self, own, merged):
        live.append(("scoring", alive(), None))
        return own_model(self, own, merged)

    monkeypatch.setattr(Federation, "end_round", checked_end_round)
    monkeypatch.setattr(Evaluation, "own_model", counted_own_model)
    run(toy(clients=10, fraction=0.2, rounds=4), tmp_path / "run")
    after_rounds = [(t, n, k) for t, n, k in live if t != "scoring"]
    assert [n for _, n, _ in after_rounds] == [0, 0, 0, 0]
    assert after_rounds[-1][2] > 2  # the store knows more clients than a round holds
    scoring = [n for t, n, _ in live if t == "scoring"]
    assert len(scoring) == after_rounds[-1][2] and max(scoring) <= 2 + 1


# -- (c) resume ------------------------------------------------------------------------------------
def crash_in_round(monkeypatch, round_: int):
    """Make Federation stop (as at Ctrl-C) when round ``round_`` begins; returns the original."""
    original = Federation._round

    def crash(self, st, t, bar):
        if t == round_:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, st, t, bar)

    monkeypatch.setattr(Federation, "_round", crash)
    return original


@pytest.mark.parametrize("cut", ["in round 2", "after round 2's client files, before its checkpoint"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch, cut):
    cfg = toy(clients=6, fraction=0.5, rounds=4, eval_clients=2)
    run(cfg, tmp_path / "straight")

    if cut == "in round 2":
        crash_in_round(monkeypatch, 2)
    else:
        original = RunStore.save_checkpoint

        def crash(self, state):
            st = state["state"]
            if st.round == 2:
                st.personal.flush(st.round)  # round 2's files are written, its checkpoint is not
                raise KeyboardInterrupt("simulated interruption")
            return original(self, state)

        monkeypatch.setattr(RunStore, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "resumed")
    monkeypatch.undo()
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)
    if cut != "in round 2":
        assert 2 in files(tmp_path / "resumed").values()  # round 2's files outlived the cut
    Federation(cfg, tmp_path / "resumed", progress=False).run(resume=True)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    assert_same_state(tmp_path / "resumed", tmp_path / "straight")
    assert files(tmp_path / "resumed") == files(tmp_path / "straight")


# -- (d) --eval-clients ----------------------------------------------------------------------------
def test_eval_clients_scores_a_seeded_sample_before_the_last_round_and_everyone_at_it(tmp_path, monkeypatch):
    scored: list[int] = []
    own_model = Evaluation.own_model

    def counted(self, own, merged):
        scored.append(1)
        return own_model(self, own, merged)

    monkeypatch.setattr(Evaluation, "own_model", counted)
    per_round = []
    end_round = Federation.end_round

    def counting_end_round(self, st, t, record, t_round):
        scored.clear()
        end_round(self, st, t, record, t_round)
        per_round.append(len(scored))

    monkeypatch.setattr(Federation, "end_round", counting_end_round)
    cfg = toy(clients=5, rounds=3, eval_clients=2)
    run(cfg, tmp_path / "a")
    assert per_round == [2, 2, 5]  # the own models scored after each round
    first = rows(tmp_path / "a")
    assert [len(r["eval_personal_clients"]) for r in first] == [2, 2, 5]
    assert first[-1]["eval_personal_clients"] == [0, 1, 2, 3, 4]
    assert all(set(r["eval_personal"]) == {"accuracy"} for r in first)
    run(cfg, tmp_path / "b")  # the same seed draws the same sample
    assert [r["eval_personal_clients"] for r in rows(tmp_path / "b")] == [r["eval_personal_clients"] for r in first]
    samples = {tuple(r["eval_personal_clients"]) for r in first[:-1]}
    seeds = {tuple(r["eval_personal_clients"]) for s in range(1, 6) for r in _samples(cfg.replace(seed=s))}
    assert len(samples | seeds) > 1  # the sample moves with the seed and round, not a fixed prefix


def _samples(cfg: RunConfig) -> list[dict]:
    """The samples an evaluation draws, without training: every client holding a model."""
    store = {i: None for i in range(cfg.clients)}

    class St:
        personal = store

    evaluation = Evaluation(cfg, None, None, None, [], [])
    return [{"eval_personal_clients": evaluation.personal_clients(St, t)} for t in range(1, cfg.rounds)]


def test_without_eval_clients_own_models_are_scored_at_the_last_round_only(tmp_path):
    run(toy(clients=4, rounds=2), tmp_path / "run")
    got = rows(tmp_path / "run")
    assert ["eval_personal" in r for r in got] == [False, True]
    assert not any("eval_personal_clients" in r for r in got)  # rows as before the option


def test_eval_clients_is_checked_up_front_and_leaves_old_identities(tmp_path):
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"--eval-clients must be >= 1"):
            check_config(toy(eval_clients=bad))
    with pytest.raises(ValueError, match=r"option eval-clients"):
        RunConfig.from_dict({"eval_clients": "some"})
    with pytest.raises(ValueError, match=r"rule 'glora' keeps none .*: leave it unset"):
        check_config(toy(rule="glora", eval_clients=2))  # accepted, it would do nothing
    saved = RunConfig().to_dict()
    del saved["eval_clients"]  # config.json of a run made before the option
    assert RunConfig.from_saved(saved).identity() == RunConfig().identity()
    assert RunConfig(eval_clients=2).identity() != RunConfig().identity()


# -- (e) an older checkpoint ---------------------------------------------------------------------
def test_a_checkpoint_with_the_states_inline_still_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Checkpoints of earlier versions held every client's state inside checkpoint.pt (as
    plain dicts, before ClientState): rewritten so, a run cut after round 1 resumes to the
    uninterrupted run, and its next checkpoint names client files."""
    cfg = toy(clients=4, fraction=0.5, rounds=3)
    run(cfg, tmp_path / "straight")
    original = crash_in_round(monkeypatch, 2)
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, old)
    monkeypatch.setattr(Federation, "_round", original)
    # The checkpoint as an older version wrote it: the states inline, no client files.
    ckpt = torch.load(old / CHECKPOINT, weights_only=False)
    store = ClientStore(old / CLIENTS, ckpt.pop(CLIENT_FILES))
    ckpt["state"].personal = {
        i: {"factors": store[i].factors, "head": store[i].head, "rank": store[i].rank} for i in store
    }
    assert ckpt["state"].personal
    torch.save(ckpt, old / CHECKPOINT)
    for p in (old / CLIENTS).iterdir():
        p.unlink()
    (old / CLIENTS).rmdir()

    loaded = RunStore(old).load_checkpoint()["state"]
    assert loaded.personal.resident == len(ckpt["state"].personal)  # in memory until the next checkpoint
    Federation(cfg, old, progress=False).run(resume=True)
    assert rows(old) == rows(tmp_path / "straight")
    assert_same_state(old, tmp_path / "straight")
    assert torch.load(old / CHECKPOINT, weights_only=False)[CLIENT_FILES] == files(old)


def test_a_missing_client_file_is_named(tmp_path):
    folder = tmp_path / "run"
    run(toy(clients=3, rounds=1), folder)
    (folder / CLIENTS / "1-r1.pt").unlink()
    st = RunStore(folder).load_checkpoint()["state"]
    assert 1 in st.personal
    with pytest.raises(ValueError, match=r"1-r1\.pt is missing: the run's checkpoint names it as client 1's state"):
        st.personal[1]
    json.dumps(sorted(st.personal))  # the other clients stay readable
    assert st.personal[0].rank == 2
