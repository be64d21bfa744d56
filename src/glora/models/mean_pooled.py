"""Sequence classification on the mean of an encoder's token states.

Sentence-transformers encoders (both of our named backbones) are trained to be read out by
the mean of their token states (their ``1_Pooling/config.json`` says so); the first token
that ``AutoModelForSequenceClassification`` pools was never trained as a sentence summary.
transformers has no sequence-classification head that mean-pools, so this small module is
written here: the encoder (LoRA goes into it as usual) and a ``classifier`` linear layer,
with the forward signature and output of a transformers classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPooledClassifier(nn.Module):
    """encoder -> masked mean over tokens -> dropout -> ``classifier`` (hidden -> num_labels).

    num_labels = 1 is a regression head (mean squared error), else cross-entropy.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        # As transformers initialises a new classification head.
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """input_ids, attention_mask, token_type_ids: (batch, seq); labels: (batch,).
        Returns logits (batch, num_labels) and, with labels, the loss."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
