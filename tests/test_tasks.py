"""Task generators: deterministic per seed, sized to the token budget, with answers recoverable from
the prompt by an independent parser; the scorer on known right and wrong outputs."""

from __future__ import annotations

import collections
import json
import re

import pytest

from tmjax import tasks


def words(sample: tasks.Sample) -> int:
    """A tokenizer-free token count: whitespace-separated words of prompt and answer prefix."""
    return len(sample.prompt.split()) + len(sample.answer_prefix.split())


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
def test_same_seed_same_sample_other_seed_other_sample(task):
    a = tasks.generate(task, seed=7, max_tokens=400, count=words)
    b = tasks.generate(task, seed=7, max_tokens=400, count=words)
    c = tasks.generate(task, seed=8, max_tokens=400, count=words)
    assert a == b
    assert a.prompt != c.prompt and a.answers != c.answers


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
@pytest.mark.parametrize("max_tokens", [250, 900])
def test_fills_but_does_not_exceed_the_budget(task, max_tokens):
    sample = tasks.generate(task, seed=1, max_tokens=max_tokens, count=words)
    used = words(sample)
    assert used <= max_tokens
    # The haystack grows by one filler unit at a time (at most ~20 words here), plus rounding of
    # the rare/common mix in common_words.
    assert used > max_tokens - 40, (used, max_tokens)


def _answers_from_prompt(sample: tasks.Sample) -> list[str]:
    """Solve the task by parsing the prompt: an independent check that the facts are really there."""
    text = sample.prompt
    if sample.task in ("niah_single", "niah_multikey"):
        key = re.search(r"What is the secret code for (\w+)\?", text).group(1)
        return re.findall(rf"The secret code for {key} is (\d+)\.", text)
    if sample.task == "niah_multivalue":
        key = re.search(r"List every secret code for (\w+) ", text).group(1)
        return re.findall(rf"One of the secret codes for {key} is (\d+)\.", text)
    if sample.task == "kv_retrieval":
        obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
        key = re.search(r'What is the value of the key "([0-9a-f-]+)"\?', text).group(1)
        return [obj[key]]
    if sample.task == "variable_tracking":
        value = re.search(r"Which variables hold the value (\d+),", text).group(1)
        holders: set[str] = set()
        for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text):
            if source == value or source[4:] in holders:
                holders.add(name)
        return sorted(holders)
    if sample.task == "common_words":
        counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", text, flags=re.MULTILINE))
        return [w for w, _ in counts.most_common(10)]
    if sample.task == "prose_recall":
        person, fact = _prose_question(text)
        return re.findall(rf"(?:(?<=\. )|^){person} {fact}", text, flags=re.MULTILINE)
    raise AssertionError(sample.task)


# prose_recall's question -> the fact sentence that answers it, as a regex with one group and {person}.
_PROSE_FACTS = {
    r"What is the name of (\w+)'s boat\?": r"keeps a small boat called the (\w+) down at the harbour\.",
    r"What is the name of (\w+)'s dog\?": r"walks a grey dog named (\w+) along the beach every morning\.",
    r"Which locker number does (\w+) use at the railway station\?": r"uses locker number (\d+) at the railway station\.",
    r"On which street does (\w+) rent a room\?": r"rents a room on (\w+) Street, above the bakery\.",
}


def _prose_question(text: str) -> tuple[str, str]:
    """(person asked about, regex of the answering fact without its subject)."""
    found = [(m.group(1), fact) for q, fact in _PROSE_FACTS.items() if (m := re.search(q, text))]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
@pytest.mark.parametrize("seed", [0, 5])
def test_answers_are_recoverable_from_the_prompt(task, seed):
    sample = tasks.generate(task, seed=seed, max_tokens=600, count=words)
    assert sorted(_answers_from_prompt(sample)) == sorted(sample.answers)
    assert sample.max_new_tokens > 0


@pytest.mark.parametrize("seed", range(6))
def test_prose_recall_has_distractors(seed):
    """Besides the answer, the story states the same fact about >= 3 other people and the asked
    person's cousin, and the asked person's other facts, all with other values."""
    sample = tasks.generate("prose_recall", seed=seed, max_tokens=700, count=words)
    person, fact = _prose_question(sample.prompt)
    same_fact = re.findall(rf"(?:(?<=\. )|^)([A-Z]\w+(?:'s cousin)?) {fact}", sample.prompt, flags=re.MULTILINE)
    holders = [who for who, _ in same_fact]
    assert holders.count(person) == 1 and f"{person}'s cousin" in holders and len(set(holders)) >= 5
    assert len({value for _, value in same_fact}) == len(same_fact)  # every value differs from the answer
    about_person = re.findall(rf"(?:(?<=\. )|^){person} (?:keeps|walks|uses|rents) ", sample.prompt, flags=re.MULTILINE)
    assert len(about_person) == 4
    assert sample.answer_prefix.startswith(person) and sample.task not in tasks.TASKS


def test_mixed_suite_takes_tasks_in_turn():
    suite = tasks.generate_mixed(["niah_single", "prose_recall", "kv_retrieval"], total=7, seed=20,
                                 max_tokens=300, count=words)
    assert [(s.task, s.seed) for s in suite] == [
        ("niah_single", 20), ("prose_recall", 20), ("kv_retrieval", 20),
        ("niah_single", 21), ("prose_recall", 21), ("kv_retrieval", 21), ("niah_single", 22),
    ]
    assert suite[3] == tasks.generate("niah_single", seed=21, max_tokens=300, count=words)
    with pytest.raises(ValueError, match="total >= 1"):
        tasks.generate_mixed(["niah_single"], total=0, seed=0, max_tokens=300, count=words)


def test_needle_depths_vary_with_the_seed():
    """Needles must not always sit at the same place, or the middle of the prompt goes untested."""
    positions = set()
    for seed in range(8):
        sample = tasks.generate("niah_single", seed=seed, max_tokens=500, count=words)
        positions.add(round(sample.prompt.index("The secret code for") / len(sample.prompt), 1))
    assert len(positions) >= 4


def test_suite_covers_tasks_and_seeds():
    suite = tasks.generate_suite(["niah_single", "kv_retrieval"], samples_per_task=3, seed=10,
                                 max_tokens=300, count=words)
    assert [(s.task, s.seed) for s in suite] == [
        ("niah_single", 10), ("niah_single", 11), ("niah_single", 12),
        ("kv_retrieval", 10), ("kv_retrieval", 11), ("kv_retrieval", 12),
    ]


def test_bad_requests_raise():
    with pytest.raises(ValueError, match="nonsense"):
        tasks.generate("nonsense", seed=0, max_tokens=100, count=words)
    with pytest.raises(ValueError, match="max_tokens=5"):
        tasks.generate("niah_single", seed=0, max_tokens=5, count=words)
    with pytest.raises(ValueError, match="samples_per_task"):
        tasks.generate_suite(["niah_single"], samples_per_task=0, seed=0, max_tokens=100, count=words)
    with pytest.raises(ValueError, match="at least one"):
        tasks.score("anything", [])


@pytest.mark.parametrize(
    "output, answers, expected",
    [
        (" 4821907.", ["4821907"], 1.0),
        (" is 4821907, I am sure", ["4821907"], 1.0),
        (" 48219070", ["4821907"], 0.0),  # a longer number is wrong
        (" 14821907", ["4821907"], 0.0),
        (" 4821906", ["4821907"], 0.0),
        (" I don't know.", ["4821907"], 0.0),
        (" 111, 222 and 333", ["111", "222", "333", "444"], 0.75),
        (" dekabu, Kosasu", ["kosasu", "dekabu"], 1.0),  # case-insensitive
        (" kosasus", ["kosasu"], 0.0),
        (' "db91f82f-a5b9-b2e7-069e-c6dbc2beaa49".', ["db91f82f-a5b9-b2e7-069e-c6dbc2beaa49"], 1.0),
        (" db91f82f-a5b9-b2e7-069e-c6dbc2beaa4", ["db91f82f-a5b9-b2e7-069e-c6dbc2beaa49"], 0.0),
    ],
)
def test_score_known_outputs(output, answers, expected):
    assert tasks.score(output, answers) == expected
