"""What `glora run` exports loads with peft and transformers alone, in a process where
importing glora fails, naming its base model by hub id, and gives glora's own logits;
a wrong load path fails loudly instead of loading a different model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from glora.cli import app
from glora.federation.config import RunConfig
from glora.federation.simulation import Federation, run_federation
from glora.models.backbones import minilm_folder
from glora.models.export import ExportInfo
from glora.models.lora import AdaptedModel, LoraSettings, export_adapter
from tests.hub_cache import add_to_hub_cache, run_without_glora
from tests.test_causal import tiny_llama

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
RUN = RunConfig(
    task="sst2",
    clients=2,
    min_client_examples=10,
    ranks="2,4",
    rounds=1,
    local_steps=3,
    batch_size=16,
    eval_every=1,
    max_train_examples=200,
    max_eval_examples=48,
    threads=1,
)

# Logits of the exported model on the given inputs, computed with transformers + peft only.
# The caller prepends `adapter`, `inputs` and `load` (the loading lines under test).
SCORE = """
import json, torch
from transformers import AutoConfig, AutoModelForSequenceClassification
from peft import AutoPeftModelForSequenceClassification, PeftModel
batches = json.load(open(inputs))
{load}
model.eval()
with torch.no_grad():
    out = [model(**{{k: torch.tensor(v) for k, v in b.items()}}).logits.tolist() for b in batches]
json.dump(out, open(inputs + ".out", "w"))
"""


def finished_run(tmp_path: Path, cfg: RunConfig) -> tuple[Path, list[dict], torch.Tensor]:
    """A short run's folder, the evaluation split's model inputs (batches) and glora's logits
    of its global model on them."""
    run_federation(cfg, tmp_path / "run", progress=False)
    fed = Federation(cfg, tmp_path / "run", progress=False)
    st = fed.begin(resume=True)
    task = fed.task
    batches = [task.inputs(task.eval.input_ids[i : i + 16]) for i in range(0, len(task.eval), 16)]
    with fed.evaluation.global_model(st) as m, torch.no_grad():
        logits = torch.cat([m(**b).logits for b in batches])
    return tmp_path / "run", [{k: v.tolist() for k, v in b.items()} for b in batches], logits


def score_without_glora(tmp_path: Path, adapter: Path, batches: list[dict], load: str) -> torch.Tensor:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(batches))
    code = f"adapter = {str(adapter)!r}\ninputs = {str(inputs)!r}\n" + SCORE.format(load=load)
    proc = run_without_glora(code, tmp_path / "hub", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.cat([torch.tensor(x) for x in json.loads((tmp_path / "inputs.json.out").read_text())])


def merged_without_glora(tmp_path: Path, run: Path, batches: list[dict], trust_remote_code: bool) -> torch.Tensor:
    """`glora export RUN --merged`, then the merged folder's logits from transformers alone."""
    result = CliRunner().invoke(app, ["export", str(run), "--merged", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    load = f"model = AutoModelForSequenceClassification.from_pretrained(adapter, trust_remote_code={trust_remote_code})"
    return score_without_glora(tmp_path, tmp_path / "merged", batches, load)


@pytest.fixture
def hub(tmp_path):
    add_to_hub_cache(tmp_path / "hub", MINILM, minilm_folder())
    return tmp_path / "hub"


@pytest.mark.slow
def test_mean_pooled_run_export_loads_without_glora_with_the_same_logits(tmp_path, hub):
    folder, batches, expected = finished_run(tmp_path, RUN)
    adapter = folder / "adapter"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == MINILM
    assert peft_config["task_type"] == "SEQ_CLS"
    assert json.loads((adapter / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    load = (
        "config = AutoConfig.from_pretrained(adapter, trust_remote_code=True)\n"
        "base = AutoModelForSequenceClassification.from_pretrained(config.base_model_name_or_path, config=config)\n"
        "model = PeftModel.from_pretrained(base, adapter)\n"
    )
    got = score_without_glora(tmp_path, adapter, batches, load)
    assert (got - expected).abs().max() < 1e-5
    # glora export --merged: one full model folder, loaded by transformers with the shipped code.
    merged_logits = merged_without_glora(tmp_path, folder, batches, trust_remote_code=True)
    assert (merged_logits - expected).abs().max() < 1e-5


@pytest.mark.slow
def test_wrong_load_paths_of_a_mean_pooled_export_fail_loudly(tmp_path, hub):
    """The backbone's own first-token classifier, with or without the adapter's config, and
    without trusting the shipped code: each raises instead of loading another model."""
    settings = LoraSettings()
    from glora.models.backbones import load_classifier

    model = load_classifier("minilm", 2, pooling="mean")[0]
    shapes = AdaptedModel(load_classifier("minilm", 2, pooling="mean")[0], settings, [2]).layer_shapes()
    updates = {n: 0.01 * torch.ones(d_out, d_in) for n, (d_out, d_in) in shapes.items()}
    head = {"classifier.weight": torch.zeros(2, 384), "classifier.bias": torch.zeros(2)}
    export_adapter(tmp_path / "adapter", model, updates, head, settings, ExportInfo(MINILM, "SEQ_CLS", 2))
    inputs = tmp_path / "inputs.json"
    inputs.write_text("[]")
    for load, error in (
        ("model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)", "No modules were targeted"),
        (
            f"base = AutoModelForSequenceClassification.from_pretrained({MINILM!r})\n"
            "model = PeftModel.from_pretrained(base, adapter)",
            "No modules were targeted",
        ),
        ("model = AutoModelForSequenceClassification.from_pretrained(adapter)", "trust_remote_code"),
    ):
        code = f"adapter = {str(tmp_path / 'adapter')!r}\ninputs = {str(inputs)!r}\n" + SCORE.format(load=load)
        proc = run_without_glora(code, hub, tmp_path)
        assert proc.returncode != 0, f"{load} loaded a mean-pooled export without its head"
        assert error in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


@pytest.mark.slow
def test_first_token_run_export_loads_with_auto_peft(tmp_path, hub):
    cfg = RUN.replace(task="cola", pooling="cls", head_lr_ratio=1.0)
    folder, batches, expected = finished_run(tmp_path, cfg)
    adapter = folder / "adapter"
    assert not (adapter / "config.json").exists()  # transformers would take it for a full model
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {"0": "unacceptable", "1": "acceptable"}
    got = score_without_glora(
        tmp_path, adapter, batches, "model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)"
    )
    assert (got - expected).abs().max() < 1e-5
    assert (merged_without_glora(tmp_path, folder, batches, trust_remote_code=False) - expected).abs().max() < 1e-5


def test_export_refuses_a_folder_without_a_run(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--merged", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "holds no finished run" in " ".join(result.output.split())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_causal_export_loads_with_auto_peft_for_causal_lm(tmp_path):
    """A causal adapter names its hub base and loads with AutoPeftModelForCausalLM alone."""
    base = tmp_path / "tiny"
    tiny_llama().save_pretrained(base)
    add_to_hub_cache(tmp_path / "hub", "glora-tests/tiny-llama", base)
    settings = LoraSettings(("q_proj", "v_proj"), head_modules=())
    adapted = AdaptedModel(tiny_llama().eval(), settings, [4])
    g = torch.Generator().manual_seed(3)
    updates = {n: 0.05 * torch.randn(d_out, d_in, generator=g) for n, (d_out, d_in) in adapted.layer_shapes().items()}
    ids = torch.randint(0, 500, (2, 9), generator=g)
    with adapted.dense_update(updates, 4, {}) as m, torch.no_grad():
        expected = m(input_ids=ids).logits
    info = ExportInfo("glora-tests/tiny-llama", "CAUSAL_LM")
    export_adapter(tmp_path / "adapter", tiny_llama().eval(), updates, {}, settings, info)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    code = (
        "import torch, json\nfrom peft import AutoPeftModelForCausalLM\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n    print(json.dumps(m(input_ids=ids).logits.tolist()))\n"
    )
    proc = run_without_glora(code, tmp_path / "hub", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (got - expected).abs().max() < 1e-5
