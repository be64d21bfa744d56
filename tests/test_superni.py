"""SuperNI data, prompts and partitioners.

Prompt budgets are checked with a word-level tokenizer (one token per word or punctuation
run), where every count is known; the segment-wise tokenisation is checked against whole-text
tokenisation with the real SmolLM2 tokenizer read from the installed GGUF file.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from glora.data.superni import (
    Example,
    Instance,
    SuperNI,
    TaskInfo,
    check_no_leakage,
    sample_client_tasks,
    sample_eval_tasks,
    split_instances,
)
from glora.data.superni_prompts import (
    IGNORE_INDEX,
    Prompt,
    PromptSettings,
    collate_for_training,
    encode_instance,
    encode_task,
    fit_prompt,
)
from glora.models.causal import smollm2_gguf

TEMPLATE_WORDS = ["Definition", "Positive", "Example", "Input", "Output", "Now", "complete", "the", "following"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """Word-level tokenizer; the pad token is the end-of-sequence token, as in SmolLM2."""
    vocab = ["[UNK]", "</s>", ":", "-", *TEMPLATE_WORDS, *map(str, range(10)), *(f"w{i}" for i in range(400))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def make_task(num_examples: int = 3) -> TaskInfo:
    examples = tuple(Example(words(100 + 20 * i, 10), words(180 + 5 * i, 3)) for i in range(num_examples))
    return TaskInfo("task1_demo", "train", "Demo", words(0, 20), examples)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def contains(ids: list[int], sub: list[int]) -> bool:
    return any(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


def test_template_reads_as_superni_prompt():
    task = TaskInfo("t", "train", "C", "Say yes.", (Example("a", "yes"), Example("b", "no"), Example("c", "x")))
    assert Prompt.build(task, " q \n", num_examples=2).text() == (
        "Definition: Say yes.\n\n"
        "Positive Example 1 -\nInput: a\nOutput: yes\n\n"
        "Positive Example 2 -\nInput: b\nOutput: no\n\n"
        "Now complete the following example -\nInput: q\nOutput:"
    )
    assert Prompt.build(task, "q", num_examples=0).text() == (
        "Definition: Say yes.\n\nNow complete the following example -\nInput: q\nOutput:"
    )


def test_only_output_tokens_carry_loss(word_tokenizer):
    tok = word_tokenizer
    task, inst = make_task(), Instance("i1", "task1_demo", words(300, 15), (words(350, 4), words(360, 2)))
    enc = encode_instance(tok, task, inst, PromptSettings(num_examples=2, max_length=200, max_target_length=16))
    input_ids, labels = enc.training_pair()
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # Exactly the last len(target) positions carry loss, and they are the first reference + EOS.
    assert supervised == list(range(len(enc.prompt), len(input_ids)))
    assert [labels[i] for i in supervised] == [*ids_of(tok, words(350, 4)), tok.eos_token_id]
    assert input_ids[: len(enc.prompt)] == list(enc.prompt)
    # The prompt itself holds the reference nowhere: the answer is not leaked into the input.
    assert not contains(list(enc.prompt), ids_of(tok, words(350, 4)))


def test_padding_carries_no_loss_even_when_pad_is_eos(word_tokenizer):
    tok = word_tokenizer
    task = make_task()
    settings = PromptSettings(num_examples=1, max_length=200, max_target_length=16)
    short = encode_instance(tok, task, Instance("a", "task1_demo", words(300, 3), (words(350, 1),)), settings)
    long = encode_instance(tok, task, Instance("b", "task1_demo", words(300, 30), (words(350, 6),)), settings)
    batch = collate_for_training([short, long], pad_token_id=tok.pad_token_id)
    n = len(short.prompt) + len(short.target)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # The short row's own EOS (same id as the padding) still carries loss.
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == len(short.target) + len(long.target)


def test_truncation_drops_examples_first_then_definition_and_keeps_the_input_end(word_tokenizer):
    tok = word_tokenizer
    task = make_task(num_examples=3)
    prompt = Prompt.build(task, words(300, 15), num_examples=3)
    full = ids_of(tok, prompt.text())
    query_tail = ids_of(tok, f"Input: {words(300, 15)}\nOutput:")
    bare = ids_of(tok, Prompt("", (), prompt.input).text())
    definition = ids_of(tok, task.definition)
    seen_examples = []
    for budget in range(len(full) + 3):
        ids = fit_prompt(tok, prompt, budget)
        if budget < len(bare):
            assert ids is None
            continue
        assert len(ids) <= budget
        assert ids[-len(query_tail) :] == query_tail  # the instance input is never cut
        k = sum(contains(ids, ids_of(tok, e.input)) for e in task.positive_examples)
        # Examples kept are always the first k, in order.
        assert all(contains(ids, ids_of(tok, e.input)) for e in task.positive_examples[:k])
        if k > 0:
            assert contains(ids, definition)  # the definition is truncated only once no example is left
        seen_examples.append(k)
    assert seen_examples == sorted(seen_examples)  # more room never means fewer examples
    assert fit_prompt(tok, prompt, len(full)) == full
    # One token short of the zero-example prompt: the definition loses its last token only.
    zero_shot = ids_of(tok, Prompt(task.definition, (), prompt.input).text())
    ids = fit_prompt(tok, prompt, len(zero_shot) - 1)
    assert contains(ids, definition[:-1]) and not contains(ids, definition)


def test_input_that_cannot_fit_is_skipped_and_counted(tmp_path, word_tokenizer):
    root = write_superni(
        tmp_path,
        {
            "task1_demo": [words(300, 5), words(300, 80), words(300, 6)],
            "task2_other": [words(300, 2)],
        },
    )
    data = SuperNI(root)
    settings = PromptSettings(num_examples=2, max_length=60, max_target_length=8)
    enc = encode_task(data, "task1_demo", word_tokenizer, settings, cache_dir=tmp_path / "cache")
    assert enc.num_skipped == 1
    assert [x.id for x in enc.instances] == ["task1_demo-0", "task1_demo-2"]
    assert all(len(x.prompt) + len(x.target) <= settings.max_length for x in enc.instances)


def test_tokenised_cache_is_reused_and_keyed_by_settings(tmp_path, word_tokenizer):
    root = write_superni(tmp_path, {"task1_demo": [words(300, 5), words(310, 9)], "task2_other": [words(300, 2)]})
    data, cache = SuperNI(root), tmp_path / "cache"
    first = encode_task(data, "task1_demo", word_tokenizer, PromptSettings(num_examples=2), cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    assert encode_task(data, "task1_demo", word_tokenizer, PromptSettings(num_examples=2), cache_dir=cache) == first
    zero_shot = encode_task(data, "task1_demo", word_tokenizer, PromptSettings(num_examples=0), cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert all(len(z.prompt) < len(f.prompt) for z, f in zip(zero_shot.instances, first.instances, strict=True))
    # Changing the task's content changes the key: a stale entry is never read.
    root2 = write_superni(tmp_path / "v2", {"task1_demo": [words(320, 5), words(310, 9)], "task2_other": [words(1, 2)]})
    changed = encode_task(SuperNI(root2), "task1_demo", word_tokenizer, PromptSettings(num_examples=2), cache_dir=cache)
    assert changed.instances[0].prompt != first.instances[0].prompt


def test_segmentwise_ids_equal_whole_text_ids_with_smollm2(smollm2_tokenizer):
    # Prompts are tokenised segment by segment; with the real byte-level BPE tokenizer the
    # result must be what tokenising the whole text gives, or training and a plain-text
    # prompt would disagree at the segment boundaries.
    tok, data = smollm2_tokenizer, SuperNI()
    for task in data.test_tasks[::10] + data.train_tasks[::60]:
        info = data.task(task)
        for inst in data.instances(task, limit=3):
            for k in (0, 2):
                prompt = Prompt.build(info, inst.input, num_examples=k)
                assert fit_prompt(tok, prompt, budget=100_000) == ids_of(tok, prompt.text()), (task, inst.id)


def test_empty_reference_is_refused(word_tokenizer):
    with pytest.raises(ValueError, match="empty output reference"):
        encode_instance(word_tokenizer, make_task(), Instance("x", "task1_demo", "w1", (" ",)), PromptSettings())


def test_reader_drops_and_counts_instances_without_reference(tmp_path):
    root = write_superni(tmp_path, {"task1_demo": [words(1, 2), words(3, 2)], "task2_other": [words(1, 2)]})
    path = root / "superni" / "tasks" / "task1_demo.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    rows[1]["output"] = [""]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = SuperNI(root)
    assert [x.id for x in data.instances("task1_demo")] == ["task1_demo-0"]
    assert data.num_empty_dropped["task1_demo"] == 1


def test_real_train_and_test_task_lists_never_overlap():
    data = SuperNI()
    assert len(data.train_tasks) == 687 and len(data.test_tasks) == 103
    assert not set(data.train_tasks) & set(data.test_tasks)
    assert {data.task(t).split for t in data.train_tasks} == {"train"}
    assert {data.task(t).split for t in data.test_tasks} == {"test"}


def test_leakage_is_refused_naming_the_task(tmp_path):
    with pytest.raises(ValueError, match="task2_b is both a training and a test task"):
        check_no_leakage(["task1_a", "task2_b"], ["task2_b", "task3_c"])
    root = write_superni(tmp_path, {"task1_demo": [words(1, 2)], "task2_other": [words(1, 2)]})
    (root / "superni" / "splits" / "test_tasks.txt").write_text("task2_other\ntask1_demo\n")
    with pytest.raises(ValueError, match="task2_other is both"):
        _ = SuperNI(root).test_tasks


def test_unknown_task_gets_a_hint():
    with pytest.raises(ValueError, match=r"unknown SuperNI task .*did you mean task1344_glue_entailment_class"):
        SuperNI().task("task1344_glue_entailment_clasification")


def test_client_tasks_are_distinct_training_tasks_fixed_by_the_seed():
    data = SuperNI()
    cats = data.categories(data.train_tasks)
    clients = sample_client_tasks(cats, num_clients=10, tasks_per_client=3, seed=1)
    flat = [t for c in clients for t in c]
    assert [len(c) for c in clients] == [3] * 10 and len(set(flat)) == 30
    assert set(flat) <= set(data.train_tasks) and not set(flat) & set(data.test_tasks)
    assert sample_client_tasks(cats, 10, 3, seed=1) == clients
    assert sample_client_tasks(cats, 10, 3, seed=2) != clients
    with pytest.raises(ValueError, match="needs 688 distinct training tasks"):
        sample_client_tasks(cats, num_clients=688)


def test_category_clients_hold_every_task_of_one_category():
    data = SuperNI()
    cats = data.categories(data.train_tasks)
    clients = sample_client_tasks(cats, num_clients=5, by_category=True, seed=0)
    held = set()
    for tasks in clients:
        (category,) = {cats[t] for t in tasks}
        assert set(tasks) == {t for t, c in cats.items() if c == category}
        held |= {category}
    assert len(held) == 5
    with pytest.raises(ValueError, match="only 60 categories"):
        sample_client_tasks(cats, num_clients=61, by_category=True)


def test_held_out_split_partitions_a_task_independently_of_the_client():
    data = SuperNI()
    inst = data.instances("task1344_glue_entailment_classification")
    train, held = split_instances(inst, 20, seed=3)
    assert len(held) == 20 and len(train) == len(inst) - 20
    assert {x.id for x in train}.isdisjoint(x.id for x in held)
    assert {x.id for x in train} | {x.id for x in held} == {x.id for x in inst}
    assert split_instances(list(inst), 20, seed=3) == (train, held)
    assert split_instances(inst, 20, seed=4)[1] != held
    with pytest.raises(ValueError, match="leave at least one"):
        split_instances(inst[:5], 5)


def test_eval_tasks_spread_over_categories():
    data = SuperNI()
    cats = data.categories(data.test_tasks)
    picked = sample_eval_tasks(cats, 20, seed=0)
    assert len(set(picked)) == 20 and set(picked) <= set(data.test_tasks)
    assert len({cats[t] for t in picked}) == 12  # every evaluation category appears
    assert sample_eval_tasks(cats, None) == sorted(data.test_tasks)


def write_superni(tmp: Path, tasks: dict[str, list[str]]) -> Path:
    """A SuperNI folder in the real layout; the first task of the dict is the test task."""
    root = tmp / "data"
    (root / "superni" / "tasks").mkdir(parents=True)
    (root / "superni" / "splits").mkdir()
    names = list(tasks)
    with gzip.open(root / "superni" / "task_metadata.jsonl.gz", "wt") as f:
        for i, name in enumerate(names):
            info = make_task()
            f.write(
                json.dumps(
                    {
                        "task_name": name,
                        "split": "test" if i == 0 else "train",
                        "categories": ["Demo"],
                        "definition": [info.definition],
                        "positive_examples": [{"input": e.input, "output": e.output} for e in info.positive_examples],
                    }
                )
                + "\n"
            )
    for name, inputs in tasks.items():
        with gzip.open(root / "superni" / "tasks" / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(
                json.dumps({"id": f"{name}-{j}", "input": x, "output": [words(350, 2)]}) + "\n"
                for j, x in enumerate(inputs)
            )
    (root / "superni" / "splits" / "test_tasks.txt").write_text(names[0] + "\n")
    (root / "superni" / "splits" / "train_tasks.txt").write_text("\n".join(names[1:]) + "\n")
    return root


def test_collate_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        collate_for_training([], pad_token_id=0)
