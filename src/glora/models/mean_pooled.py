"""Sequence classification on the mean of an encoder's token states, as a transformers model.

Sentence-transformers encoders (both of our named backbones) are trained to be read out by
the mean of their token states (their ``1_Pooling/config.json`` says so); the first token
that ``AutoModelForSequenceClassification`` pools was never trained as a sentence summary.
transformers has no sequence-classification head that mean-pools, so this small model is
written here: the encoder (LoRA goes into it as usual) and a ``classifier`` linear layer.

It follows the transformers convention for custom heads (a ``PreTrainedConfig`` with its own
``model_type`` and a ``PreTrainedModel``), so that what glora exports loads without glora:
this file imports torch and transformers only, and is copied beside every export of a
mean-pooled model (``auto_map`` names it; loaded with ``trust_remote_code=True``). Its
``model_type`` is its own, so transformers never silently falls back to the backbone's
first-token classifier for a mean-pooled export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "glora-mean-pooled"


class MeanPooledConfig(PreTrainedConfig):
    """The classifier's config: the encoder's own config (``backbone``, a dict with its
    ``model_type``), the labels (``num_labels``, ``id2label``) and, in an exported adapter,
    the hub id or folder of the pretrained encoder (``base_model_name_or_path``)."""

    model_type = MODEL_TYPE

    def __init__(self, backbone: dict | None = None, base_model_name_or_path: str | None = None, **kwargs) -> None:
        self.backbone = dict(backbone or {})
        self.base_model_name_or_path = base_model_name_or_path
        super().__init__(**kwargs)

    def backbone_config(self) -> PreTrainedConfig:
        """The encoder's config as its own class (BertConfig, MPNetConfig, ...)."""
        values = dict(self.backbone)
        return AutoConfig.for_model(values.pop("model_type"), **values)


def init_head(linear: nn.Linear, encoder_config: PreTrainedConfig) -> nn.Linear:
    """As transformers initialises a new classification head: normal weights, zero bias."""
    nn.init.normal_(linear.weight, std=getattr(encoder_config, "initializer_range", 0.02))
    nn.init.zeros_(linear.bias)
    return linear


def new_head(encoder_config: PreTrainedConfig, num_labels: int) -> nn.Linear:
    """A new (hidden -> num_labels) head. Built outside the model's ``__init__`` where a seeded
    head matters: PreTrainedModel's construction draws from torch's generator first."""
    return init_head(nn.Linear(encoder_config.hidden_size, num_labels), encoder_config)


class MeanPooledClassifier(PreTrainedModel):
    """encoder -> masked mean over tokens -> dropout -> ``classifier`` (hidden -> num_labels).

    num_labels = 1 is a regression head (mean squared error), else cross-entropy. Built
    around a loaded ``encoder`` (glora's training), from its config alone (transformers'
    ``from_config``), or by ``from_pretrained`` of an encoder checkpoint (the encoder's
    weights load into ``encoder``, the head is new) or of a saved classifier.
    """

    config_class = MeanPooledConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(
        self, config: MeanPooledConfig, encoder: nn.Module | None = None, classifier: nn.Linear | None = None
    ) -> None:
        super().__init__(config)
        enc_cfg = config.backbone_config() if encoder is None else encoder.config
        self.encoder = AutoModel.from_config(enc_cfg) if encoder is None else encoder
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(getattr(enc_cfg, "hidden_dropout_prob", 0.1))
        self.classifier = classifier if classifier is not None else new_head(enc_cfg, config.num_labels)
        if classifier is not None:
            # post_init() initialises every module not flagged as done: a given head is kept.
            self.classifier._is_hf_initialized = True
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """What ``from_pretrained`` initialises that a checkpoint lacks: only the head is ours;
        the encoder's modules are its own class's business."""
        if module is self.classifier:
            init_head(module, self.encoder.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """input_ids, attention_mask, token_type_ids: (batch, seq); labels: (batch,).
        Returns logits (batch, num_labels) and, with labels, the loss."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        # A reduced-precision encoder feeds the float32 head (a no-op for a float32 encoder).
        logits = self.classifier(self.dropout(pooled).to(self.classifier.weight.dtype))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# Importing this file (glora itself, or transformers running it as an export's remote code)
# makes the Auto classes know the model: AutoModelForSequenceClassification.from_pretrained
# of a hub encoder with a MeanPooledConfig then builds this class.
AutoConfig.register(MODEL_TYPE, MeanPooledConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPooledConfig, MeanPooledClassifier, exist_ok=True)
