"""Long-context tasks built offline from a seed, and their exact scorer.

Every task hides a few facts in a long haystack and asks for them back. A generator first draws the
facts from the seed, then grows the haystack (a prefix-stable stream of filler units) to the largest
size whose prompt still fits ``max_tokens`` as counted by the caller's ``count`` (the model's tokenizer
with its chat template), so the same seed gives the same sample for the same tokenizer and length.
Each prompt ends with an answer prefix, so that the model's first generated token is the answer's
first token: that is what the gradient probe and the first-token KL measure. ``encode`` turns a
sample into prompt and answer token ids for a transformers tokenizer (chat template included).

``TASKS`` are the synthetic haystacks that ``tmjax probe`` uses by default; ``HELD_OUT_TASKS`` are
prompt styles it does not see (``prose_recall``: a story with facts about people to recall among
distractors), so that a switch layer chosen with the probe is judged on text unlike its own.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import zlib
from collections.abc import Callable, Sequence

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "kv_retrieval",
    "variable_tracking",
    "common_words",
)
HELD_OUT_TASKS = ("prose_recall",)
ALL_TASKS = TASKS + HELD_OUT_TASKS


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance: ``prompt`` is the user message, ``answer_prefix`` starts the reply."""

    task: str
    seed: int
    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int


Counter = Callable[[Sample], int]

# Plain sentences for the haystack; the needles are the only statements about codes or variables.
_FILLER = (
    "The river bends twice before it reaches the old mill.",
    "Most of the village gathers at the market on the first morning of the month.",
    "A cold wind came down from the hills and the shutters rattled all night.",
    "She kept her notes in a green folder that never left her desk.",
    "The train to the coast was late again, so the travellers played cards.",
    "Bread from the corner bakery sells out before noon on most days.",
    "The library moved its maps to the second floor after the flood.",
    "Two gardeners argued politely about when to prune the apple trees.",
    "The lighthouse keeper wrote a short letter to his sister every week.",
    "Children raced paper boats along the gutter after the rain stopped.",
    "The committee postponed its decision until the spring meeting.",
    "An old clock in the hall gains a minute every few days.",
    "The bridge was painted grey, then red, then grey once more.",
    "Fishermen mended their nets in the shade of the harbour wall.",
    "The museum opened a small room for drawings by local students.",
    "A choir practised in the chapel while the snow kept falling.",
    "Nobody remembered who had planted the row of chestnut trees.",
    "The baker's cat slept on a sack of flour by the warm oven.",
    "Clouds drifted east and the afternoon turned bright and quiet.",
    "The road to the quarry is closed to heavy trucks in winter.",
)

# Keys for the needles: common concrete nouns, one or two tokens in most tokenizers.
_KEYS = (
    "anchor", "apple", "badger", "banner", "barrel", "basket", "beacon", "blanket", "bottle", "bridge",
    "bucket", "butter", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cellar", "cherry",
    "circle", "closet", "cobalt", "compass", "copper", "cotton", "crystal", "dagger", "desert", "dragon",
    "engine", "falcon", "feather", "fiddle", "forest", "fossil", "garden", "garlic", "glacier", "goblet",
    "granite", "hammer", "harbor", "helmet", "hornet", "island", "jacket", "jungle", "kettle", "ladder",
    "lantern", "lemon", "lizard", "magnet", "marble", "meadow", "mirror", "monkey", "mustard", "needle",
    "noodle", "orange", "oyster", "paddle", "palace", "parrot", "pebble", "pencil", "pepper", "pillow",
    "planet", "pocket", "puzzle", "rabbit", "ribbon", "rocket", "saddle", "salmon", "signal", "silver",
    "spider", "spoon", "statue", "tablet", "teapot", "temple", "thunder", "ticket", "tiger", "tunnel",
    "turtle", "velvet", "violin", "walnut", "wagon", "window", "wizard", "yogurt", "zebra", "zipper",
)

# prose_recall: a story about a harbour town (no names, no facts) and people with recallable facts.
_STORY = (
    "Summer arrived late that year, and the harbour stayed grey until the middle of June.",
    "In the evenings the ferry brought day visitors back from the islands, sunburnt and quiet.",
    "The town council argued for a month about repainting the fish market, then painted it blue.",
    "Someone left a bicycle chained to the lamp post outside the post office for the whole season.",
    "On market days the square smelled of smoked mackerel, strawberries and warm tar.",
    "A storm in July tore the awning off the hotel and scattered deck chairs along the promenade.",
    "The old lighthouse was opened to visitors on Sundays, and the queue reached the chapel.",
    "Gulls learned to wait on the railings of the cafe terrace for the last crumbs of the afternoon.",
    "Every Thursday a brass band practised in the school hall with the windows wide open.",
    "The tide went out so far in August that children walked to the sandbank and back.",
    "Nobody could agree on who had first hung paper lanterns along the quay, but everyone liked them.",
    "The bookshop put a table of second-hand novels outside and trusted people to pay.",
    "Fog rolled in most mornings and burned off by ten, leaving the slate roofs shining.",
    "A travelling circus camped in the meadow behind the church for one loud week.",
    "The fishermen complained about the price of diesel and then went out before dawn anyway.",
    "At the end of the pier an old man sold bait and weather forecasts, both unreliable.",
    "The regatta was postponed twice for wind and finally sailed in a flat calm.",
    "Late at night the only sound was the rigging of the moored yachts tapping against the masts.",
    "The bakery ran out of cinnamon buns by nine, so people queued outside before it opened.",
    "When the festival ended, volunteers swept the streets and stacked the benches in the town hall.",
)
_PEOPLE = (
    "Marta", "Oskar", "Ingrid", "Helena", "Viktor", "Elena", "Ruben", "Sofia", "Anton", "Greta",
    "Milan", "Nadia", "Pavel", "Lotte", "Emil", "Irene", "Klara", "Felix", "Hugo", "Vera",
)
# attribute -> (fact with {who} and {value}, question about {person}, answer prefix, kind of value)
_ATTRIBUTES = {
    "boat": ("{who} keeps a small boat called the {value} down at the harbour.",
             "What is the name of {person}'s boat? Answer with the name only.",
             "{person}'s boat is called the", "word"),
    "dog": ("{who} walks a grey dog named {value} along the beach every morning.",
            "What is the name of {person}'s dog? Answer with the name only.",
            "{person}'s dog is named", "word"),
    "locker": ("{who} uses locker number {value} at the railway station.",
               "Which locker number does {person} use at the railway station? Answer with the number only.",
               "{person} uses locker number", "number"),
    "street": ("{who} rents a room on {value} Street, above the bakery.",
               "On which street does {person} rent a room? Answer with the street name only.",
               "{person} rents a room on", "word"),
}

_SYLLABLE_ONSETS = "bdfgklmnprstvz"
_SYLLABLE_VOWELS = "aeiou"


def _rng(task: str, seed: int, stream: str) -> random.Random:
    """An independent, platform-stable random stream per (task, seed, purpose)."""
    return random.Random(zlib.crc32(f"{task}/{seed}/{stream}".encode()))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    hexdigits = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return "-".join((hexdigits[:8], hexdigits[8:12], hexdigits[12:16], hexdigits[16:20], hexdigits[20:]))


def _pseudo_words(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct made-up words of three syllables (unlimited supply, no word list to ship)."""
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        word = "".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) for _ in range(3))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _filler(task: str, seed: int, n: int) -> list[str]:
    """The first ``n`` haystack sentences; the first ``n`` are the same whatever ``n`` is."""
    rng = _rng(task, seed, "filler")
    return [rng.choice(_FILLER) for _ in range(n)]


def _insert(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """``units`` with ``items[k]`` placed at relative depth ``depths[k]`` (0 = start, 1 = end)."""
    out = list(units)
    for item, depth in sorted(zip(items, depths), key=lambda pair: pair[1], reverse=True):
        out.insert(round(depth * len(units)), item)
    return out


def _haystack_task(task: str, seed: int, n: int, needles: list[str], question: str, prefix: str,
                   answers: tuple[str, ...], max_new_tokens: int, depths: list[float]) -> Sample:
    intro = "Some facts are hidden in the long text below. Read it carefully; a question follows.\n\n"
    body = " ".join(_insert(_filler(task, seed, n), needles, depths))
    return Sample(task, seed, f"{intro}{body}\n\n{question}", prefix, answers, max_new_tokens)


def _niah_single(seed: int, n: int) -> Sample:
    rng = _rng("niah_single", seed, "facts")
    key, value, depth = rng.choice(_KEYS), _number(rng), rng.random()
    return _haystack_task(
        "niah_single", seed, n, [f"The secret code for {key} is {value}."],
        f"What is the secret code for {key}? Answer with the number only.",
        f"The secret code for {key} is", (value,), 12, [depth],
    )


def _niah_multikey(seed: int, n: int, num_keys: int = 4) -> Sample:
    rng = _rng("niah_multikey", seed, "facts")
    keys = rng.sample(_KEYS, num_keys)
    values = [_number(rng) for _ in keys]
    depths = [rng.random() for _ in keys]
    asked = rng.randrange(num_keys)
    return _haystack_task(
        "niah_multikey", seed, n, [f"The secret code for {k} is {v}." for k, v in zip(keys, values)],
        f"What is the secret code for {keys[asked]}? Answer with the number only.",
        f"The secret code for {keys[asked]} is", (values[asked],), 12, depths,
    )


def _niah_multivalue(seed: int, n: int, num_values: int = 4) -> Sample:
    rng = _rng("niah_multivalue", seed, "facts")
    key = rng.choice(_KEYS)
    values = [_number(rng) for _ in range(num_values)]
    depths = [rng.random() for _ in values]
    return _haystack_task(
        "niah_multivalue", seed, n, [f"One of the secret codes for {key} is {v}." for v in values],
        f"List every secret code for {key} given in the text, separated by commas.",
        f"The secret codes for {key} are", tuple(values), 12 * num_values, depths,
    )


def _kv_retrieval(seed: int, n: int) -> Sample:
    rng = _rng("kv_retrieval", seed, "facts")
    where = rng.random()
    pairs_rng = _rng("kv_retrieval", seed, "filler")
    pairs = [(_uuid(pairs_rng), _uuid(pairs_rng)) for _ in range(max(n, 1))]
    key, value = pairs[min(int(where * len(pairs)), len(pairs) - 1)]
    body = ",\n".join(f'  "{k}": "{v}"' for k, v in pairs)
    prompt = (
        "Below is a JSON object of key-value pairs; every key and value is a UUID.\n\n"
        f"{{\n{body}\n}}\n\nWhat is the value of the key \"{key}\"? Answer with the UUID only."
    )
    return Sample("kv_retrieval", seed, prompt, f'The value of the key "{key}" is', (value,), 48)


def _variable_tracking(seed: int, n: int, hops: int = 4) -> Sample:
    rng = _rng("variable_tracking", seed, "facts")
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in statements)  # the chain reads in order
    intro = "Track the chain of variable assignments hidden in the text below.\n\n"
    body = " ".join(_insert(_filler("variable_tracking", seed, n), statements, depths))
    question = f"Which variables hold the value {value}, directly or through other variables? List them all."
    prefix = f"The variables that hold the value {value} are"
    return Sample("variable_tracking", seed, f"{intro}{body}\n\n{question}", prefix, tuple(names), 8 * (hops + 1))


def _common_words(seed: int, n: int, num_common: int = 10) -> Sample:
    rng = _rng("common_words", seed, "facts")
    common = _pseudo_words(rng, num_common)
    rare = _pseudo_words(_rng("common_words", seed, "filler"), max(n, 1), exclude=set(common))
    repeats = max(3, round(0.03 * len(rare)))
    words = rare + [w for w in common for _ in range(repeats)]
    _rng("common_words", seed, f"order/{n}").shuffle(words)
    listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    prompt = (
        "Below is a numbered list of words. A few of them appear many times, the others once.\n\n"
        f"{listing}\n\nWhich {num_common} words appear most often in the list? List them, separated by commas."
    )
    prefix = f"The {num_common} words that appear most often are"
    return Sample("common_words", seed, prompt, prefix, tuple(common), 6 * num_common)


def _prose_recall(seed: int, n: int, num_people: int = 4) -> Sample:
    """A story with one person's facts to recall; distractors: that person's other facts, the same fact
    about other people, and about the person's cousin (a near-miss phrasing)."""
    rng = _rng("prose_recall", seed, "facts")
    people = rng.sample(_PEOPLE, num_people)
    person, asked = people[0], rng.choice(sorted(_ATTRIBUTES))
    holders = [(person, attribute) for attribute in _ATTRIBUTES]
    holders += [(who, asked) for who in [*people[1:], f"{person}'s cousin"]]
    words = iter(w.capitalize() for w in _pseudo_words(rng, len(holders)))
    numbers = iter(str(x) for x in rng.sample(range(1000, 10_000), len(holders)))
    facts, answer = [], ""
    for who, attribute in holders:
        template, _, _, kind = _ATTRIBUTES[attribute]
        value = next(words if kind == "word" else numbers)
        facts.append(template.format(who=who, value=value))
        if (who, attribute) == (person, asked):
            answer = value
    depths = [rng.random() for _ in facts]
    story = _rng("prose_recall", seed, "filler")
    body = " ".join(_insert([story.choice(_STORY) for _ in range(n)], facts, depths))
    _, question, prefix, _ = _ATTRIBUTES[asked]
    prompt = (f"Read this account of a summer in a harbour town; a question about it follows.\n\n{body}\n\n"
              f"{question.format(person=person)}")
    return Sample("prose_recall", seed, prompt, prefix.format(person=person), (answer,), 12)


_BUILDERS: dict[str, Callable[[int, int], Sample]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "prose_recall": _prose_recall,
}


def generate(task: str, *, seed: int, max_tokens: int, count: Counter) -> Sample:
    """The sample of ``task`` for ``seed`` with the largest haystack whose ``count(sample)`` (the
    prompt's token count, chat template and answer prefix included) is at most ``max_tokens``.

    Raises ``ValueError`` for an unknown task, or when even the smallest haystack does not fit.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {ALL_TASKS}")
    build = _BUILDERS[task]
    if count(build(seed, 1)) > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is too small for task {task!r}: the smallest prompt "
                         f"has {count(build(seed, 1))} tokens")
    low, high = 1, 2  # invariant: build(low) fits; grow ``high`` until it does not
    while count(build(seed, high)) <= max_tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if count(build(seed, mid)) <= max_tokens:
            low = mid
        else:
            high = mid
    return build(seed, low)


def generate_suite(tasks: Sequence[str], *, samples_per_task: int, seed: int, max_tokens: int,
                   count: Counter) -> list[Sample]:
    """``samples_per_task`` samples of each task; sample ``k`` of every task uses seed ``seed + k``."""
    if samples_per_task < 1:
        raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
    return [generate(t, seed=seed + k, max_tokens=max_tokens, count=count)
            for t in tasks for k in range(samples_per_task)]


def generate_mixed(tasks: Sequence[str], *, total: int, seed: int, max_tokens: int, count: Counter) -> list[Sample]:
    """``total`` samples taking ``tasks`` in turn: sample ``k`` is ``tasks[k % len(tasks)]`` with seed
    ``seed + k // len(tasks)``. Any prefix covers the tasks evenly, which matters to a calibration that
    stops measuring a configuration after its first few samples."""
    if total < 1 or not tasks:
        raise ValueError(f"generate_mixed needs total >= 1 and at least one task, got {total} and {list(tasks)}")
    return [generate(tasks[k % len(tasks)], seed=seed + k // len(tasks), max_tokens=max_tokens, count=count)
            for k in range(total)]


def _found(answer: str, output: str) -> bool:
    """Whether ``answer`` occurs in ``output`` as a whole word (not inside a longer word or number)."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])"
    return re.search(pattern, output, flags=re.IGNORECASE) is not None


def score(output: str, answers: Sequence[str]) -> float:
    """Fraction of the expected ``answers`` that appear, each as a whole word, in ``output``.

    Case-insensitive; ``1234567`` is not found in ``12345678``. A one-answer task scores 0 or 1.
    """
    if not answers:
        raise ValueError("score needs at least one expected answer, got none")
    return sum(_found(a, output) for a in answers) / len(answers)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A sample as model input: the prompt's token ids and the reference answer's token ids."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def prompt_text(tokenizer: object, sample: Sample) -> str:
    """The user message in the tokenizer's chat template (if it has one), then the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{sample.prompt}\n\n"
    return text + sample.answer_prefix


def _ids(tokenizer: object, text: str) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer.encode(text, add_special_tokens=special))


def encode(tokenizer: object, sample: Sample) -> Encoded:
    """Tokenize ``sample`` for a transformers ``tokenizer``; the reference answer is the expected
    answers joined by ``", "`` after a space.

    Prompt and answer are cut from one tokenization of the whole text, and blank tokens at the cut
    (a tokenizer that splits ``" 1234567"`` into ``" "`` and digits) go to the prompt, so that the
    first answer token, the one the probe and the first-token KL look at, carries content.
    """
    text = prompt_text(tokenizer, sample)
    base = _ids(tokenizer, text)
    full = _ids(tokenizer, f"{text} {', '.join(sample.answers)}")
    cut = 0
    while cut < min(len(base), len(full)) and base[cut] == full[cut]:
        cut += 1
    while cut < len(full) and not tokenizer.decode([full[cut]]).strip():
        cut += 1
    if cut == len(full):
        raise ValueError(f"the answer {sample.answers!r} of task {sample.task!r} encodes to no content tokens")
    return Encoded(tuple(full[:cut]), tuple(full[cut:]))


def token_counter(tokenizer: object) -> Counter:
    """``count`` for ``generate``: prompt tokens (plus one for a split-off space) plus the sample's
    ``max_new_tokens``, so that prompt and answer fit the budget together."""
    return lambda sample: len(_ids(tokenizer, prompt_text(tokenizer, sample))) + 1 + sample.max_new_tokens
