"""A Flower ClientApp that fine-tunes a peft LoRA adapter, written with flwr, peft, transformers
and torch only (no glora): a FlowerTune-style client, at the LoRA rank of its node.

Every node builds the same tiny random BERT classifier from a config (seeded: no download, the
same base weights on every node), puts a LoRA adapter of its own rank on the attention's query
and value projections (ranks 2, 4 and 8, by partition id) and trains it, with the classifier,
on its own synthetic data.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification

RANKS = (2, 4, 8)  # a node's LoRA rank, by its partition id
LORA_ALPHA = 16  # at every rank; the server reads the updates with it: GLoRAStrategy(lora_alpha=16)
VOCAB, LENGTH, EXAMPLES = 64, 12, 64

app = ClientApp()


def peft_model(rank: int) -> PeftModel:
    torch.manual_seed(0)  # the same base weights and initial classifier on every node
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    lora = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=LORA_ALPHA, target_modules=["query", "value"])
    return get_peft_model(BertForSequenceClassification(config), lora)


def local_data(partition: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences, labelled 1 when the first token is in the lower half of the
    vocabulary; every partition and split draws its own."""
    g = torch.Generator().manual_seed(2 * partition + (split == "test"))
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)
    return ids, (ids[:, 0] < VOCAB // 2).long()


def received_model(msg: Message, context: Context) -> tuple[PeftModel, int]:
    """This node's model with what the server sent loaded, and the node's partition id."""
    partition = int(context.node_config["partition-id"])
    model = peft_model(RANKS[partition % len(RANKS)])
    # The server's readout at this node's rank; until the server knows the rank, only the
    # head comes, and the LoRA tensors stay at their fresh initialisation.
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    return model, partition


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    model, partition = received_model(msg, context)
    ids, labels = local_data(partition, "train")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = MetricRecord({"train-loss": loss.item(), "num-examples": len(labels)})
    reply = RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(model)), "metrics": metrics})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, partition = received_model(msg, context)
    ids, labels = local_data(partition, "test")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    accuracy = (out.logits.argmax(-1) == labels).float().mean().item()
    metrics = MetricRecord({"eval-loss": out.loss.item(), "accuracy": accuracy, "num-examples": len(labels)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
