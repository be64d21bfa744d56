"""`glora aggregate` and `glora.aggregate_adapters`: client adapters made with peft on a tiny
model, aggregated, written as peft adapters that reload in peft with the rule's update; the
bad inputs each give one clear line; the README's snippets run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from glora import LowRank, aggregate_adapters, get_rule
from glora.aggregation import RULES
from glora.cli import app
from glora.peft_server import write_adapters
from tests.conftest import make_updates, rel_err

ROOT = Path(__file__).resolve().parents[1]
TINY = BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=2,
)
HEAD = "base_model.model.classifier.weight"

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")


def save_base(folder: Path, config: BertConfig = TINY) -> Path:
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random BERT classifier saved to a folder: the clients' base model."""
    return save_base(tmp_path_factory.mktemp("base") / "tiny-bert")


def peft_model(base: Path, config: LoraConfig, seed: int) -> PeftModel:
    """A client's model made with peft, its factors and head moved off their initialisation
    (random, seeded) so that every layer's update is non-zero."""
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def lora_config(rank: int, **options) -> LoraConfig:
    return LoraConfig(
        **{"r": rank, "lora_alpha": 16, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **options}
    )


def make_adapter(folder: Path, base: Path, rank: int, seed: int, **options) -> Path:
    peft_model(base, lora_config(rank, **options), seed).save_pretrained(folder)
    return folder


def peft_factors(model: PeftModel) -> dict[str, LowRank]:
    """Every LoRA layer as peft holds it: (B, A, the scaling peft applies), by module name."""
    return {
        n: LowRank(m.lora_B["default"].weight.detach(), m.lora_A["default"].weight.detach(), m.scaling["default"])
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def loaded(base: Path, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), adapter)


def weighted_head(models: list[PeftModel], weights: list[float]) -> torch.Tensor:
    heads = [get_peft_model_state_dict(m)[HEAD].double() for m in models]
    return sum(w * h for w, h in zip(weights, heads, strict=True)) / sum(weights)


def test_cli_writes_the_global_update_and_each_ranks_readout_and_they_reload_in_peft(tmp_path, base):
    clients = [make_adapter(tmp_path / f"client-{r}", base, r, seed=r) for r in (2, 4, 8)]
    out = tmp_path / "out"
    args = ["aggregate", *map(str, clients), "--rule", "glora", "--weights", "3,1,2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["global", "rank-2", "rank-4", "rank-8"]
    assert "rank-4 (received by client 1)" in result.output

    # The expected states, from what peft itself holds of each client.
    models = [loaded(base, c) for c in clients]
    per_client = [peft_factors(m) for m in models]
    states = {n: get_rule("glora").aggregate([f[n] for f in per_client], [3, 1, 2]) for n in per_client[0]}
    head = weighted_head(models, [3, 1, 2])

    glob = loaded(base, out / "global")
    got = peft_factors(glob)
    assert set(got) == set(states) and len(states) == 4
    for n, state in states.items():
        assert rel_err(got[n].delta(), state.delta()) < 1e-6, n
    assert rel_err(get_peft_model_state_dict(glob)[HEAD], head) < 1e-6
    for r in (2, 4, 8):
        model = loaded(base, out / f"rank-{r}")
        got = peft_factors(model)
        for n, state in states.items():
            assert got[n].rank == r
            assert rel_err(got[n].delta(), state.readout(r, 16 / r).delta()) < 1e-6, (r, n)
        assert rel_err(get_peft_model_state_dict(model)[HEAD], head) < 1e-6
    # The clients' shared config fields are kept.
    config = LoraConfig.from_pretrained(out / "rank-4")
    assert config.base_model_name_or_path == str(base) and config.task_type == "SEQ_CLS"
    assert config.target_modules == {"query", "value"}


def test_rank_and_alpha_patterns_and_rslora_scale_each_layer_as_peft_does(base):
    configs = [
        lora_config(4, lora_alpha=8, rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3}),
        lora_config(8, use_rslora=True),
    ]
    models = [peft_model(base, c, seed=i) for i, c in enumerate(configs)]
    pairs = [(get_peft_model_state_dict(m), m.peft_config["default"]) for m in models]
    result = aggregate_adapters(pairs, [2, 5], rule="glora")

    per_client = [peft_factors(m) for m in models]
    for n, state in result["layers"].items():
        expected = get_rule("glora").aggregate([f[n] for f in per_client], [2, 5])
        assert rel_err(state.delta(), expected.delta()) < 1e-12, n
    assert result["clients"] == ["rank-4", "rank-8"]
    # The rank-4 readout is client 0's layout (rank 2 on one layer) and loads into its model.
    readout = result["adapters"]["rank-4"]
    assert readout["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"].shape == (2, 16)
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base), result["configs"]["rank-4"])
    set_peft_model_state_dict(model, readout)
    for n, f in peft_factors(model).items():
        target = result["layers"][n].readout(per_client[0][n].rank, per_client[0][n].scale)
        assert rel_err(f.delta(), target.delta()) < 1e-6, n


def test_a_merging_rules_adapters_hold_the_total_update(tmp_path, base):
    # FLoRA merges the stacked mean into the base weights and restarts the adapter: every
    # folder holds that total update (rank up to 2 + 4), not a fresh rank-r adapter.
    clients = [make_adapter(tmp_path / f"client-{r}", base, r, seed=r) for r in (2, 4)]
    result = aggregate_adapters(clients, rule="flora")
    write_adapters(tmp_path / "out", result)
    for name in ("global", "rank-2", "rank-4"):
        got = peft_factors(loaded(base, tmp_path / "out" / name))
        assert next(iter(got.values())).rank == 6
        for n, state in result["layers"].items():
            assert rel_err(got[n].delta(), state.delta()) < 1e-6, (name, n)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_states_total_is_its_update(rule):
    # Equal ranks and a shared A: input every rule accepts (FFA-LoRA needs A shared).
    ups = make_updates([4, 4, 4], shared_A=True)
    state = get_rule(rule).aggregate(ups, [1.0, 2.0, 3.0])
    total = state.total()
    assert rel_err(total.delta() if isinstance(total, LowRank) else total, state.delta()) < 1e-12


def one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["aggregate", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path, base):
    a, b = (make_adapter(tmp_path / f"client-{i}", base, 4, seed=i) for i in (0, 1))
    c16 = make_adapter(tmp_path / "client-16", base, 16, seed=2)
    other = make_adapter(tmp_path / "other-base", save_base(tmp_path / "another-bert"), 4, seed=3)
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "out")]
    assert "is not a peft adapter folder (no adapter_config.json)" in one_error_line([str(tmp_path / "empty"), *out])
    line = one_error_line([str(a), str(other), *out])
    assert re.search(r"client 1 \(.*other-base\): base_model_name_or_path '.*another-bert' differs", line)
    assert "needs equal client ranks but got ranks [4, 4, 16]" in one_error_line(
        [str(a), str(b), str(c16), "--rule", "fedit", *out]
    )
    assert "got 2 weights for 3 client updates" in one_error_line([str(a), str(b), str(c16), "--weights", "1,2", *out])
    assert "weight -1.0 is negative" in one_error_line([str(a), str(b), "--weights", "1,-1", *out])
    assert "all client weights are zero" in one_error_line([str(a), str(b), "--weights", "0,0", *out])
    assert "comma-separated" in one_error_line([str(a), str(b), "--weights", "1,x", *out])
    assert not (tmp_path / "out").exists()


def test_layers_target_modules_and_lora_kinds_that_differ_are_named(base):
    def pair(rank=4, seed=0, **options):
        model = peft_model(base, lora_config(rank, **options), seed)
        return get_peft_model_state_dict(model), model.peft_config["default"]

    sd, config = pair()
    # peft adds "classifier" to a SEQ_CLS config's modules_to_save whether it is named or not.
    aggregate_adapters([pair(), pair(modules_to_save=["classifier"])])
    with pytest.raises(ValueError, match=r"client 1: target_modules \['key', 'query', 'value'\] differs"):
        aggregate_adapters([pair(), pair(target_modules=["query", "key", "value"])])
    cut = {k: (v[:, :8] if k.endswith("layer.1.attention.self.value.lora_A.weight") else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"client 1: layer '.*layer\.1\.attention\.self\.value' has shape"):
        aggregate_adapters([(sd, config), (cut, config)])
    with pytest.raises(ValueError, match=r"client 0: tensor '.*lora_magnitude_vector' is not a linear layer's"):
        aggregate_adapters([pair(use_dora=True), pair(use_dora=True)])


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "examples" / "flower-peft" / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_snippets_run_as_written(tmp_path, base, monkeypatch):
    for i, r in enumerate((2, 4, 8)):
        make_adapter(tmp_path / f"client-{i}", base, r, seed=i)
    monkeypatch.chdir(tmp_path)
    (command,) = [b.strip() for b in readme_blocks("bash") if b.startswith("glora aggregate")]
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["global", "rank-2", "rank-4", "rank-8"]
    (code,) = [b for b in readme_blocks("python") if "aggregate_adapters(" in b]
    namespace: dict = {}
    exec(code, namespace)
    out = namespace["out"]
    assert out["clients"] == ["rank-2", "rank-4", "rank-8"]  # what the snippet's comment says
    assert out["adapters"]["rank-4"][f"{next(iter(out['layers']))}.lora_A.weight"].shape[0] == 4


def test_the_main_readmes_section_shows_only_these_snippets():
    # The section "Use the GLoRA server in your own pipeline" of README.md repeats the
    # example's snippets, which the tests here and in test_flower_peft_strategy.py run.
    _, _, rest = (ROOT / "README.md").read_text().partition("\n## Use the GLoRA server in your own pipeline\n")
    if not rest:
        pytest.skip("README.md has no section 'Use the GLoRA server in your own pipeline' yet")
    blocks = re.findall(r"```\w*\n(.*?)```", rest.split("\n## ", 1)[0], flags=re.S)
    assert blocks and all(b in readme_blocks("bash") + readme_blocks("python") for b in blocks)
