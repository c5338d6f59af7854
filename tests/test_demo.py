"""The demo's haystack prompt: the pass key appears once, at the requested depth, near the target length."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tmjax.demo import FILLER, build_prompt


@pytest.fixture(scope="module")
def tokenizer():
    words = sorted(set((FILLER + " pass key is Remember it. There a hidden inside lot of irrelevant text Find and "
                        "memorize What the Answer with number only ?").replace(".", " . ").split()))
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tok


@pytest.mark.parametrize("target, depth", [(300, 0.0), (2000, 0.4), (2000, 1.0)])
def test_prompt_hides_one_key_at_the_depth(tokenizer, target, depth):
    text, key = build_prompt(tokenizer, target, depth, seed=target)
    assert len(key) == 5 and key.isdigit()
    fact = f"The pass key is {key}."
    assert text.count(fact) == 1
    haystack_start = text.index("memorize it.") + len("memorize it.")
    haystack_end = text.index("What is the pass key?")
    position = (text.index(fact) - haystack_start) / (haystack_end - haystack_start)
    assert abs(position - depth) < 0.1
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    assert 0.8 * target <= n_tokens <= 1.05 * target


def test_seed_picks_the_key(tokenizer):
    keys = {build_prompt(tokenizer, 300, 0.5, seed=s)[1] for s in range(5)}
    assert len(keys) > 1
    assert build_prompt(tokenizer, 300, 0.5, seed=3) == build_prompt(tokenizer, 300, 0.5, seed=3)
