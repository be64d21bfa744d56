"""SuperNI prompts, their token budget, and the tokenised cache.

A prompt is the task definition, k positive examples and the instance input::

    Definition: <definition>

    Positive Example 1 -
    Input: <input>
    Output: <output>

    Now complete the following example -
    Input: <instance input>
    Output:

and the target is `` <output>`` plus the end-of-sequence token. Only the target carries
loss. The prompt budget is ``max_length - max_target_length`` whether the instance is
used for training or for generation, so the model is scored on exactly the prompts it was
trained on. An over-long prompt drops examples (last first), then truncates the end of the
definition; the instance input is never cut. An instance whose input does not fit even
with no examples and no definition is skipped and counted.

The prompt is tokenised segment by segment (definition, each example, the query), each
segment beginning with its blank-line separator, so that dropping or truncating one costs
no re-tokenisation; for byte-level BPE tokenizers this gives the same ids as tokenising
the whole text (a slow test checks it on the real tokenizer).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glora.cache import default_cache_dir
from glora.data.superni import Example, Instance, SuperNI, TaskInfo

# Bumped whenever the template or the budget rule changes, so old cache files are not reused.
TEMPLATE_VERSION = 1
IGNORE_INDEX = -100
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are built. ``max_target_length`` also caps the tokens generated at evaluation."""

    num_examples: int = 2
    max_length: int = 256
    max_target_length: int = 32

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {self.num_examples}")
        if not 0 < self.max_target_length < self.max_length:
            raise ValueError(
                f"need 0 < max_target_length < max_length, got {self.max_target_length} and {self.max_length}"
            )

    @property
    def prompt_budget(self) -> int:
        return self.max_length - self.max_target_length


@dataclass(frozen=True)
class Prompt:
    """The text parts of one prompt, before fitting it to a token budget."""

    definition: str
    examples: tuple[Example, ...]
    input: str

    @classmethod
    def build(cls, task: TaskInfo, text: str, num_examples: int = 2) -> Prompt:
        """The prompt for input ``text`` of ``task`` with its first ``num_examples`` positive examples."""
        return cls(task.definition.strip(), task.positive_examples[:num_examples], text.strip())

    def segments(self) -> list[str]:
        """Definition, examples and query; every segment but the first starts with its separator."""
        parts = [f"Definition: {self.definition}"] if self.definition else []
        parts += [
            f"Positive Example {i} -\nInput: {e.input}\nOutput: {e.output}" for i, e in enumerate(self.examples, 1)
        ]
        parts.append(f"Now complete the following example -\nInput: {self.input}\nOutput:")
        return [p if i == 0 else SEPARATOR + p for i, p in enumerate(parts)]

    def text(self) -> str:
        return "".join(self.segments())


def target_text(output: str) -> str:
    """The target follows ``Output:`` after one space, as it would in running text."""
    return " " + output.strip()


class SegmentIds:
    """Token ids of text segments, each tokenised once: a task's definition and examples
    recur in every one of its prompts."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prefix: list[int] = tokenizer("")["input_ids"]  # a BOS token for tokenizers that add one
        self._memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._memo[text]


def fit_prompt(tokenizer, prompt: Prompt, budget: int, segment_ids: SegmentIds | None = None) -> list[int] | None:
    """The prompt's ids within ``budget`` tokens, or None when even the bare query does not fit.

    Drops examples from the last, then keeps the longest prefix of the definition that
    fits (dropping it when nothing of it beyond ``Definition:`` would remain).
    """
    tok = segment_ids or SegmentIds(tokenizer)
    room = budget - len(tok.prefix)
    for k in range(len(prompt.examples), -1, -1):
        ids = [tok(s) for s in Prompt(prompt.definition, prompt.examples[:k], prompt.input).segments()]
        if sum(map(len, ids)) <= room:
            return tok.prefix + [t for seg in ids for t in seg]
    query = tok(Prompt("", (), prompt.input).segments()[-1])
    if prompt.definition:
        head = len(tok("Definition:"))
        definition, query_after = ids[0], ids[-1]
        keep = room - len(query_after)
        if keep > head:
            return tok.prefix + definition[:keep] + query_after
    return tok.prefix + query if len(query) <= room else None


def encode_target(tokenizer, output: str, max_target_length: int) -> list[int]:
    """Target ids: `` <output>`` and the end-of-sequence token, cut to ``max_target_length``
    (a cut target loses its end-of-sequence token: the real output goes on)."""
    if not output.strip():
        raise ValueError("empty output reference: a target needs at least one non-blank reference output")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token: the model could not learn where to stop")
    ids = tokenizer(target_text(output), add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id][:max_target_length]


@dataclass(frozen=True)
class EncodedInstance:
    """One tokenised instance: prompt ids (for generation), target ids (for training) and the
    references (for scoring). Training uses prompt + target, with loss on the target only."""

    id: str
    task: str
    prompt: tuple[int, ...]
    target: tuple[int, ...]
    references: tuple[str, ...]

    def training_pair(self) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are IGNORE_INDEX on the prompt, the target ids after it."""
        return list(self.prompt + self.target), [IGNORE_INDEX] * len(self.prompt) + list(self.target)


@dataclass(frozen=True)
class EncodedTask:
    task: str
    category: str
    instances: tuple[EncodedInstance, ...]
    num_skipped: int  # inputs too long for the prompt budget even without examples or definition


def encode_instance(
    tokenizer, task: TaskInfo, instance: Instance, settings: PromptSettings, segment_ids: SegmentIds | None = None
) -> EncodedInstance | None:
    """One instance's prompt and target ids, or None when its input cannot fit the budget.

    The target is the first reference (most instances have one; SuperNI scores against all).
    """
    if not instance.outputs or not any(o.strip() for o in instance.outputs):
        raise ValueError(f"instance {instance.id} of {task.name} has an empty output reference")
    prompt = fit_prompt(
        tokenizer, Prompt.build(task, instance.input, settings.num_examples), settings.prompt_budget, segment_ids
    )
    if prompt is None:
        return None
    output = next(o for o in instance.outputs if o.strip())
    target = encode_target(tokenizer, output, settings.max_target_length)
    return EncodedInstance(instance.id, task.name, tuple(prompt), tuple(target), instance.outputs)


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer("")["input_ids"]])
    return hashlib.sha256((spec + extra).encode()).hexdigest()[:16]


def encode_task(
    data: SuperNI,
    task: str,
    tokenizer,
    settings: PromptSettings = PromptSettings(),
    cache_dir: Path | None = None,
) -> EncodedTask:
    """Every instance of ``task``, tokenised, read from the disk cache when it is there.

    The cache key covers the tokenizer's definition, the task's content (metadata and
    instances), the settings and the template version, so a stale entry is never read.
    ``cache_dir=None`` uses ``<GLORA_CACHE_DIR or ./cache>/superni_tokens``.
    """
    info = data.task(task)
    key_src = json.dumps(
        [TEMPLATE_VERSION, tokenizer_fingerprint(tokenizer), task, data.content_hash(task), asdict(settings)]
    )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "superni_tokens"
    path = folder / f"{task}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            stored = json.load(f)
        items = tuple(
            EncodedInstance(r["id"], task, tuple(r["prompt"]), tuple(r["target"]), tuple(r["references"]))
            for r in stored["instances"]
        )
        return EncodedTask(task, info.category, items, stored["num_skipped"])
    segment_ids = SegmentIds(tokenizer)
    encoded = [encode_instance(tokenizer, info, x, settings, segment_ids) for x in data.instances(task)]
    items = tuple(e for e in encoded if e is not None)
    result = EncodedTask(task, info.category, items, len(encoded) - len(items))
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as f:
        json.dump(
            {
                "instances": [
                    {"id": e.id, "prompt": e.prompt, "target": e.target, "references": e.references} for e in items
                ],
                "num_skipped": result.num_skipped,
            },
            f,
        )
    os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    return result


def collate_for_training(items: Sequence[EncodedInstance], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids, attention_mask, labels, each (batch, longest).

    Padding carries no loss and no attention; the pad id may equal the end-of-sequence id,
    which is why padding is told apart by the mask, not by the id.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    pairs = [x.training_pair() for x in items]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
