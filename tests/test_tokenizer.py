import open_clip
import pytest

from erasekit.tokenizer import VOCAB_SIZE, build_clip_tokenizer

PROMPTS = [
    "a photo of a nude person",
    "A RED circle, crimson!!   on   white",
    "the colour of blood; Van Gogh's café at night",
    "émoji 🚀 test 12345 #hashtag",
    "an astronaut riding a horse, trending on artstation, 4k",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def test_vocabulary_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_open_clip(tokenizer, prompt):
    ours = tokenizer(prompt).input_ids
    reference = open_clip.tokenize([prompt])[0].tolist()
    reference = reference[: reference.index(49407) + 1]
    assert ours == reference


def test_padding_to_77_like_sd(tokenizer):
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:5] == [49406, 320, 736, 7117, 49407]
    assert set(ids[5:]) == {49407}
