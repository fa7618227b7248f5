from pathlib import Path

import pytest

from erasekit.concepts import (
    available_concepts,
    load_concept,
    prompt_set_from_list,
    read_prompt_set,
    resolve_prompts,
)
from erasekit.errors import ErasekitError, UnknownNameError


def test_text_reader_skips_blank_and_comment_lines(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na red circle\n\n  a blue square  \n")
    ps = read_prompt_set(f)
    assert ps.format == "text"
    assert ps.prompts == ["a red circle", "a blue square"]
    assert [e.seed for e in ps.entries] == [None, None]
    assert len(ps.sha256) == 64 and ps.name == "p"


def test_i2p_csv(tmp_path: Path):
    f = tmp_path / "i2p.csv"
    f.write_text(
        "prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,"
        "sd_safety_percentage,prompt_toxicity,sd_seed,sd_guidance_scale,sd_image_width\n"
        '"a painting, dark","sexual,violence",1,50.0,33.3,http://x,10,0.1,1234,7,512\n'
        "a calm lake,hate,0,0,0,http://y,0,0.0,99,8.5,512\n"
    )
    ps = read_prompt_set(f)
    assert ps.format == "i2p"
    first, second = ps.entries
    assert first.prompt == "a painting, dark"
    assert first.seed == 1234 and first.guidance == 7.0
    assert first.categories == ("sexual", "violence")
    assert first.extra["nudity_percentage"] == "33.3"
    assert second.seed == 99 and second.guidance == 8.5


def test_unlearndiffatk_csv(tmp_path: Path):
    f = tmp_path / "u.csv"
    f.write_text(
        "case_number,prompt,evaluation_seed,evaluation_guidance\n"
        "17,a nude person,2942,7.5\n"
        "23,a naked man,123,7.5\n"
    )
    ps = read_prompt_set(f)
    assert ps.format == "unlearndiffatk"
    assert [e.id for e in ps.entries] == ["17", "23"]
    assert [e.seed for e in ps.entries] == [2942, 123]


def test_csv_without_prompt_column(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("text,seed\nhello,1\n")
    with pytest.raises(ErasekitError, match="no 'prompt' \\(or 'caption'\\) column"):
        read_prompt_set(f)


def test_csv_bad_seed_names_the_row(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("prompt,sd_seed\nok,1\nbad,abc\n")
    with pytest.raises(ErasekitError, match=r"bad.csv:3: sd_seed is not a number"):
        read_prompt_set(f)


def test_csv_empty_prompt_names_the_row(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("prompt,sd_seed\nok,1\n,2\n")
    with pytest.raises(ErasekitError, match=r"bad.csv:3: empty prompt"):
        read_prompt_set(f)


@pytest.mark.parametrize("content", ["", "\n\n# only a comment\n", "prompt,sd_seed\n"])
def test_empty_files_are_errors(tmp_path: Path, content: str):
    suffix = ".csv" if content.startswith("prompt") else ".txt"
    f = tmp_path / f"empty{suffix}"
    f.write_text(content)
    with pytest.raises(ErasekitError, match="empty"):
        read_prompt_set(f)


def test_resolve_prompts_literal_file_and_missing_file(tmp_path: Path):
    assert resolve_prompts("a red circle").prompts == ["a red circle"]
    f = tmp_path / "p.txt"
    f.write_text("x\ny\n")
    assert resolve_prompts(str(f)).prompts == ["x", "y"]
    with pytest.raises(ErasekitError, match="prompt file not found"):
        resolve_prompts(str(tmp_path / "missing.csv"))


def test_limit_keeps_hash_and_marks_subset():
    ps = prompt_set_from_list(["a", "b", "c"], name="abc")
    sub = ps.limit(2)
    assert sub.prompts == ["a", "b"] and sub.sha256 == ps.sha256 and sub.name == "abc[:2]"
    assert ps.limit(10) is ps


def test_inline_hash_is_content_hash():
    assert prompt_set_from_list(["a", "b"]).sha256 == prompt_set_from_list([" a", "b "]).sha256
    assert prompt_set_from_list(["a", "b"]).sha256 != prompt_set_from_list(["b", "a"]).sha256


@pytest.mark.parametrize("name", ["nudity", "church", "van-gogh"])
def test_builtin_concepts_load(name: str):
    c = load_concept(name)
    assert c.name == name
    assert len(c.forget) >= 5 and len(c.retain) >= 5
    assert c.surrogate and c.detector["name"] in ("nudenet", "clip", "world")
    assert c.evaluation, "every concept names evaluation prompt sets"
    assert name in available_concepts()
    described = c.describe()
    assert len(described["forget"]["sha256"]) == 64


def test_nudity_spec_has_implicit_prompts_with_seeds():
    c = load_concept("nudity")
    implicit = c.evaluation["implicit"]
    assert implicit.format == "unlearndiffatk"
    assert all(e.seed is not None for e in implicit.entries)
    # implicit prompts avoid the concept's own words
    assert not any("nude" in p or "naked" in p for p in implicit.prompts)


def test_unknown_concept_did_you_mean():
    with pytest.raises(UnknownNameError, match="did you mean 'nudity'"):
        load_concept("nudty")


def test_concept_spec_from_yaml_file(tmp_path: Path):
    (tmp_path / "forget.txt").write_text("a photo of a cat\na cat on a sofa\n")
    spec = tmp_path / "cat.yaml"
    spec.write_text(
        "name: cat\nkind: object\nforget: forget.txt\nsurrogate: a photo of an animal\n"
        "retain: [a photo of a dog, a photo of a horse]\n"
        "detector: {name: clip, target: cat, classes: [cat, dog]}\n"
    )
    c = load_concept(str(spec))
    assert c.forget.prompts == ["a photo of a cat", "a cat on a sofa"]
    assert c.retain.format == "inline" and len(c.retain) == 2
    assert c.evaluation == {}


def test_concept_spec_missing_keys(tmp_path: Path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nkind: object\nforget: [x]\n")
    with pytest.raises(ErasekitError, match="lacks surrogate, retain, detector"):
        load_concept(str(spec))


def test_concept_spec_bad_kind_and_yaml(tmp_path: Path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: b\nkind: thing\nforget: [x]\nsurrogate: y\nretain: [z]\ndetector: {name: clip}\n"
    )
    with pytest.raises(ErasekitError, match="kind must be one of"):
        load_concept(str(spec))
    spec.write_text("name: [unclosed\n")
    with pytest.raises(ErasekitError, match="invalid YAML"):
        load_concept(str(spec))
    with pytest.raises(ErasekitError, match="concept spec not found"):
        load_concept(str(tmp_path / "nope.yaml"))


def test_shipped_prompt_sets_are_large_enough():
    nudity = load_concept("nudity")
    assert len(nudity.evaluation["explicit"]) >= 50 and len(nudity.evaluation["implicit"]) >= 50
    assert all(e.seed is not None for e in nudity.evaluation["implicit"].entries)
    assert len(nudity.retain) >= 200 and len(set(nudity.retain.prompts)) == len(nudity.retain)
    concept_words = ("nude", "naked", "topless", "nsfw")
    implicit = " ".join(nudity.evaluation["implicit"].prompts).lower()
    assert not any(w in implicit for w in concept_words)


def test_concept_templates_expand(tmp_path):
    church = load_concept("church")
    templates = church.evaluation["templates"]
    assert len(templates) == 25 and templates.format == "template"
    assert all("church" in p for p in templates.prompts)
    assert "templates/object.txt" in templates.source
    style = load_concept("van-gogh").evaluation["templates"]
    assert all("Vincent van Gogh" in p for p in style.prompts)
    spec = tmp_path / "two.yaml"
    spec.write_text(
        "name: two\nkind: object\nforget: {template: templates/object.txt, fill: [cat, dog]}\n"
        "surrogate: a photo\nretain: [a photo of a bird]\ndetector: {name: world}\n"
    )
    forget = load_concept(str(spec)).forget
    assert len(forget) == 50 and forget.prompts[:2] == ["a photo of a cat", "a photo of a dog"]
    spec.write_text(
        "name: two\nkind: object\nforget: {template: templates/object.txt}\n"
        "surrogate: a photo\nretain: [a photo of a bird]\ndetector: {name: world}\n"
    )
    with pytest.raises(ErasekitError, match="exactly 'template'"):
        load_concept(str(spec))
