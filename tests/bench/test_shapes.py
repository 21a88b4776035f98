"""The generated Shapes dataset: determinism, disjoint splits, correct answers, German grammar, tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from amad.bench.data import (
    ANSWERS,
    BlipCaptionCollator,
    Scene,
    Seq2SeqCollator,
    ShapeObject,
    ShapesConfig,
    VQACollator,
    build_shapes_tokenizer,
    caption_view,
    generate_shapes,
    load_shapes,
    render_scene,
    sample_scene,
    save_shapes,
    translation_view,
    vqa_view,
)
from amad.bench.data.captions import CaptionPlan, Mention
from amad.bench.data.german import count_phrase, german_caption, noun_phrase, prepositional_phrase
from amad.bench.data.scenes import BACKGROUND, CELL, GRID, JITTER

SMALL = ShapesConfig(seed=3, train_size=40, validation_size=12, test_size=12)


@pytest.fixture(scope="module")
def data():
    return generate_shapes(SMALL)


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_shapes_tokenizer(data)


def all_rows(data):
    """Rows of every split without their images (decoding images is the slow part)."""
    return [row for split in data.values() for row in split.remove_columns("image")]


def same_rows(a, b) -> bool:
    """Whether two datasets hold the same columns and values (compared as Arrow tables)."""
    return a.column_names == b.column_names and a.data.table.equals(b.data.table)


def scene_of(row) -> list[dict]:
    return list(row["objects"])


# -- determinism and splits ------------------------------------------------------
def test_same_seed_same_data_other_seed_other_data(data):
    again = generate_shapes(SMALL)
    for split in data:
        assert same_rows(data[split], again[split])
    other = generate_shapes(ShapesConfig(seed=4, train_size=40, validation_size=12, test_size=12))
    assert other["train"]["objects"] != data["train"]["objects"]


def test_test_split_does_not_depend_on_training_size(data):
    bigger = generate_shapes(ShapesConfig(seed=3, train_size=80, validation_size=12, test_size=12))
    assert same_rows(bigger["test"], data["test"])
    assert same_rows(bigger["validation"], data["validation"])
    assert len(bigger["train"]) == 80


def test_splits_are_disjoint_and_sized(data):
    layouts = {}
    for split, part in data.items():
        assert len(part) == SMALL.size(split)
        layouts[split] = {tuple((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in objs)
                          for objs in part["objects"]}
        assert len(layouts[split]) == len(part)
    assert not layouts["train"] & layouts["validation"]
    assert not layouts["train"] & layouts["test"]
    assert not layouts["validation"] & layouts["test"]


def test_images_match_their_scene(data):
    row = data["train"][0]
    image = np.asarray(row["image"], dtype=np.uint8)
    assert image.shape == (48, 48, 3)
    np.testing.assert_array_equal(image, render_scene(Scene.from_records(row["objects"])))
    for o in row["objects"]:  # the object's colour is at its cell centre
        cy, cx = o["row"] * 16 + 8 + o["dy"], o["col"] * 16 + 8 + o["dx"]
        assert tuple(image[cy, cx]) != (28, 28, 32)


def test_jittered_scenes_stay_in_their_cells():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 4, 4, jitter=True) for _ in range(30)]
    shifts = {(o.dx, o.dy) for scene in scenes for o in scene.objects}
    reach = max(JITTER.values())
    assert len(shifts) > 5 and all(abs(dx) <= reach and abs(dy) <= reach for dx, dy in shifts)
    for scene in scenes[:5]:  # nothing drawn outside an object's own cell
        image = render_scene(scene)
        for o in scene.objects:
            cell = image[o.row * CELL:(o.row + 1) * CELL, o.col * CELL:(o.col + 1) * CELL]
            assert (cell != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).sum() > 10
        occupied = {(o.row, o.col) for o in scene.objects}
        for r in range(GRID):
            for c in range(GRID):
                if (r, c) not in occupied:
                    assert (image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] == BACKGROUND).all()


def test_scene_validation_errors():
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("circle", "pink", "small", 0, 0)
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((ShapeObject("circle", "red", "small", 0, 0), ShapeObject("square", "red", "small", 0, 0)))
    with pytest.raises(ValueError, match="same size, colour and shape"):
        Scene((ShapeObject("circle", "red", "small", 0, 0), ShapeObject("circle", "red", "small", 0, 1)))
    with pytest.raises(ValueError, match="train_size"):
        ShapesConfig(train_size=-1)


# -- questions: answers recomputed from the scene by an independent reader -----------------
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond"}
WORDS = {"small": "size", "large": "size", "red": "colour", "green": "colour", "blue": "colour",
         "yellow": "colour", "purple": "colour", "circle": "shape", "square": "shape", "triangle": "shape",
         "diamond": "shape", "object": None}
DIRECTION = {"left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1), "below": ("row", 1)}


def resolve(objects: list[dict], phrase: str) -> dict:
    """The single object a phrase like "small red circle" or "red object" names (asserts it is unique)."""
    wanted = {WORDS[w]: w for w in phrase.split() if WORDS[w] is not None}
    found = [o for o in objects if all(o[k] == v for k, v in wanted.items())]
    assert len(found) == 1, f"{phrase!r} names {len(found)} objects"
    return found[0]


def related(objects: list[dict], anchor: dict, relation: str) -> list[dict]:
    axis, sign = DIRECTION[relation]
    return [o for o in objects if o is not anchor and np.sign(o[axis] - anchor[axis]) == sign]


def recompute(objects: list[dict], question: str) -> str:
    q = question.removesuffix(" ?")
    if m := re.fullmatch(r"what colour is the object (left of|right of|above|below) the (.+)", q):
        (only,) = related(objects, resolve(objects, m[2]), m[1])
        return only["colour"]
    if m := re.fullmatch(r"what shape is (left of|right of|above|below) the (.+)", q):
        (only,) = related(objects, resolve(objects, m[2]), m[1])
        return only["shape"]
    if m := re.fullmatch(r"what (colour|shape|size) is the (.+)", q):
        return resolve(objects, m[2])[m[1]]
    if m := re.fullmatch(r"how many (\w+) objects are there", q):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there", q):
        return str(sum(o["shape"] == PLURAL[m[1]] for o in objects))
    if m := re.fullmatch(r"is there a (\w+) (\w+)", q):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    raise AssertionError(f"unknown question form: {question!r}")


def test_answers_are_in_vocabulary_and_correct(data):
    rows = all_rows(data)
    seen_types = set()
    for row in rows:
        assert len(row["questions"]) == SMALL.questions_per_image
        assert len(set(row["questions"])) == len(row["questions"])
        for question, answer, qtype in zip(row["questions"], row["answers"], row["question_types"]):
            assert answer in ANSWERS
            assert recompute(scene_of(row), question) == answer, question
            seen_types.add(qtype)
    assert len(seen_types) >= 8


def test_vqa_view_has_one_row_per_question(data):
    view = vqa_view(data["validation"])
    assert len(view) == sum(len(q) for q in data["validation"]["questions"])
    first = view[0]
    assert ANSWERS[first["answer_id"]] == first["answer"]
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(data["validation"][0]["image"]))


# -- captions and German ------------------------------------------------------------
def test_german_noun_phrases_agree_in_gender_and_case():
    assert noun_phrase("circle", ("red",), "indefinite", "nominative") == "ein roter Kreis"
    assert noun_phrase("square", ("red",), "indefinite", "nominative") == "ein rotes Quadrat"
    assert noun_phrase("diamond", ("red",), "indefinite", "nominative") == "eine rote Raute"
    assert noun_phrase("triangle", ("large", "blue"), "indefinite", "accusative") == "ein großes blaues Dreieck"
    assert noun_phrase("circle", ("large", "blue"), "indefinite", "accusative") == "einen großen blauen Kreis"
    assert noun_phrase("diamond", ("small", "purple"), "definite", "nominative") == "die kleine violette Raute"
    assert count_phrase("circle", 2) == "zwei Kreise"
    assert count_phrase("diamond", 3) == "drei Rauten"
    assert count_phrase("circle", 1) == "einen Kreis"


def test_german_prepositions_take_the_dative():
    red = lambda shape: Mention(ShapeObject(shape, "red", "small", 1, 1))  # noqa: E731
    assert prepositional_phrase("left of", red("circle")) == "links vom kleinen roten Kreis"
    assert prepositional_phrase("right of", red("square")) == "rechts vom kleinen roten Quadrat"
    assert prepositional_phrase("left of", red("diamond")) == "links von der kleinen roten Raute"
    assert prepositional_phrase("above", red("triangle")) == "über dem kleinen roten Dreieck"
    assert prepositional_phrase("below", red("diamond")) == "unter der kleinen roten Raute"


def test_german_sentences_for_a_fixed_scene():
    circle = ShapeObject("circle", "yellow", "large", 0, 0)
    diamond = ShapeObject("diamond", "green", "small", 0, 2)
    plan = CaptionPlan("relation", (Mention(circle), Mention(diamond, vague=True)), relation="left of")
    assert german_caption(plan) == "der große gelbe Kreis ist links von der kleinen grünen Raute ."
    counts = CaptionPlan("counts", counts=(("circle", 1), ("diamond", 1)))
    assert german_caption(counts) == "das Bild enthält einen Kreis und eine Raute ."
    inventory = CaptionPlan("inventory", (Mention(circle), Mention(diamond)))
    assert german_caption(inventory) == (
        "es gibt zwei Objekte : einen großen gelben Kreis und eine kleine grüne Raute ."
    )


# independent agreement rule: (article, gender) -> adjective ending
AGREEMENT = {("ein", "m"): "er", ("ein", "n"): "es", ("eine", "f"): "e", ("einen", "m"): "en",
             ("der", "m"): "e", ("das", "n"): "e", ("die", "f"): "e", ("dem", "m"): "en",
             ("dem", "n"): "en", ("der", "f"): "en", ("vom", "m"): "en", ("vom", "n"): "en"}
NOUN_GENDER = {"Kreis": "m", "Quadrat": "n", "Dreieck": "n", "Raute": "f"}


def test_every_generated_german_noun_phrase_agrees(data):
    checked = 0
    for row in all_rows(data):
        for sentence in row["captions_de"]:
            words = sentence.split()
            for i, word in enumerate(words):
                if word not in NOUN_GENDER or words[i - 1] in ("zwei", "drei", "vier"):
                    continue
                j = i - 1
                while words[j] not in {a for a, _ in AGREEMENT}:
                    j -= 1
                ending = AGREEMENT.get((words[j], NOUN_GENDER[word]))
                assert ending is not None, f"article {words[j]!r} with {word!r} in {sentence!r}"
                for adjective in words[j + 1:i]:
                    assert adjective.endswith(ending), f"{adjective!r} before {word!r} in {sentence!r}"
                checked += 1
    assert checked > 200


def test_captions_translations_and_vague_sources_line_up(data):
    vague_seen = 0
    for row in all_rows(data):
        captions, german, sources = row["captions"], row["captions_de"], row["sources_en"]
        assert 4 <= len(captions) <= 5 and len(german) == len(captions) == len(sources)
        objects = scene_of(row)
        for caption, source in zip(captions, sources):
            restored = source
            for size, colour in re.findall(r"(small|large) (\w+) object\b", source):
                restored = restored.replace(f"{size} {colour} object", f"{size} {colour} "
                                            f"{resolve(objects, f'{size} {colour}')['shape']}", 1)
                vague_seen += 1
            assert restored == caption
    assert vague_seen > 20


# -- tokenizer, views, collators, disk ------------------------------------------------------
def test_tokenizer_round_trip_and_save_load(data, tokenizer, tmp_path):
    texts = [t for row in all_rows(data) for key in ("questions", "captions", "captions_de", "sources_en")
             for t in row[key]]
    encoded = tokenizer(texts)["input_ids"]
    assert all(ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids for ids in encoded)
    assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == texts
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts[:50])["input_ids"] == encoded[:50]
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_save_and_load_shapes(data, tokenizer, tmp_path):
    save_shapes(data, tokenizer, tmp_path / "shapes")
    loaded, tok = load_shapes(tmp_path / "shapes")
    assert same_rows(loaded["test"], data["test"])
    assert tok.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError):
        load_shapes(tmp_path / "missing")


def test_collators_make_model_batches(data, tokenizer):
    rows = [vqa_view(data["test"])[i] for i in range(3)]
    batch = VQACollator(tokenizer)(rows)
    assert batch["pixel_values"].shape == (3, 3, 48, 48) and batch["pixel_values"].abs().max() <= 1.0
    assert batch["labels"].tolist() == [r["answer_id"] for r in rows]
    pairs = translation_view(data["test"])
    rows = [pairs[i] for i in range(4)]
    batch = Seq2SeqCollator(tokenizer, "translate")(rows)
    target_ids = tokenizer([r["target"] for r in rows])["input_ids"]
    for labels, ids in zip(batch["labels"].tolist(), target_ids):
        assert labels[: len(ids)] == ids and all(x == -100 for x in labels[len(ids):])
    captions = caption_view(data["test"])
    blip = BlipCaptionCollator(tokenizer)([captions[i] for i in range(2)])
    assert torch.all(blip["input_ids"][:, 0] == tokenizer.bos_token_id)
    assert tokenizer.decode(blip["input_ids"][0], skip_special_tokens=True) == captions[0]["caption"]
