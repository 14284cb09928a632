"""The built-in shapes data: deterministic, captions that say what is drawn, held-out pairs absent."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sdclip.errors import BadInput
from sdclip.shapes import (
    COLOURS,
    HELD_OUT,
    NOVEL_SHAPES,
    SHAPES,
    TRAIN_SHAPES,
    Shapes,
    eval_set,
    labels,
    phrase,
    pictures,
    render,
)

WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def test_deterministic_by_seed_and_index():
    a, b, c = Shapes(size=48, seed=1), Shapes(size=48, seed=1), Shapes(size=48, seed=2)
    for i in (0, 7, 999):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ca == cb and np.array_equal(np.asarray(ia), np.asarray(ib))
    assert [a[i][1] for i in range(20)] != [c[i][1] for i in range(20)]
    assert a[3][0].size == (48, 48) and a[3][0].mode == "RGB"


def test_captions_name_what_is_drawn_and_never_a_held_out_pair():
    data = Shapes(size=64, seed=0)
    pairs, templates, counts = set(), set(), 0
    for i in range(3000):
        scene = data.scene(i)
        named = WORDS.findall(scene.caption)
        assert sorted(named) == sorted((t.colour, t.shape) for t in scene.things), scene.caption
        for t in scene.things:
            assert (t.colour, t.shape) not in HELD_OUT and t.shape in TRAIN_SHAPES
            assert t.radius <= t.x <= 64 - t.radius and t.radius <= t.y <= 64 - t.radius
            pairs.add((t.colour, t.shape))
        counts += len(scene.things) == 2
        templates.add(re.sub(WORDS, "X", scene.caption.replace("small ", "").replace("large ", "")))
    assert pairs == set(labels()) - HELD_OUT  # every seen pair occurs
    assert 0.2 < counts / 3000 < 0.4 and len(templates) >= 8


def test_relations_match_positions():
    data = Shapes(size=64, seed=3, pair_p=1.0)
    for i in range(300):
        scene = data.scene(i)
        a, b = scene.things
        caption = scene.caption
        m = WORDS.search(caption)
        first = a if (a.colour, a.shape) == m.groups() else b
        second = b if first is a else a
        if " above " in caption:
            assert first.y + first.radius < second.y - second.radius
        elif " below " in caption:
            assert first.y - first.radius > second.y + second.radius
        elif " left of " in caption:
            assert first.x + first.radius < second.x - second.radius
        elif " right of " in caption:
            assert first.x - first.radius > second.x + second.radius


def test_held_out_set_and_novel_shapes():
    assert len(HELD_OUT) == 8 and {c for c, _ in HELD_OUT} == set(COLOURS)
    assert {s for _, s in HELD_OUT} == set(TRAIN_SHAPES)
    assert not set(NOVEL_SHAPES) & set(TRAIN_SHAPES) and len(TRAIN_SHAPES) >= 6 and len(COLOURS) >= 6
    held = eval_set("held_out", 16, size=32)
    assert {(c, s) for _, c, s in held} == HELD_OUT
    seen = eval_set("seen", 40)
    assert not {(c, s) for _, c, s in seen} & HELD_OUT
    with pytest.raises(BadInput):
        eval_set("test", 3)


def test_pictures_of_any_pair():
    made = pictures([("red", "crescent"), ("blue", "heart")], 5, size=32, seed=3)
    assert [(c, s) for _, c, s in made] == [("red", "crescent"), ("blue", "heart")] * 2 + [("red", "crescent")]
    assert all(image.size == (32, 32) for image, _, _ in made)
    again = pictures([("red", "crescent"), ("blue", "heart")], 5, size=32, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _, _), (b, _, _) in zip(made, again))
    assert (
        eval_set("held_out", 3, 32, seed=5)[2][0].tobytes()
        == pictures(sorted(HELD_OUT, key=labels().index), 3, 32, seed=5)[2][0].tobytes()
    )
    for bad in ([("red", "blob")], [("grey", "circle")], []):
        with pytest.raises(BadInput, match="colour x shape"):
            pictures(bad, 2, 32)


def test_every_shape_draws_distinctly():
    from sdclip.shapes import Scene, Thing

    masks = []
    for shape in SHAPES:
        image = render(Scene((Thing("red", shape, "", 32, 32, 20, 0),), "light", ""), 64, np.random.default_rng(0))
        masks.append(np.asarray(image)[..., 1] < 100)  # red has little green; the background has much
    for i in range(len(SHAPES)):
        assert 300 < masks[i].sum() < 1700, SHAPES[i]
        for j in range(i):
            assert (masks[i] != masks[j]).sum() > 80, (SHAPES[i], SHAPES[j])


def test_novel_shapes_on_request_and_articles():
    data = Shapes(size=32, shapes=NOVEL_SHAPES, exclude=frozenset())
    assert {data.scene(i).things[0].shape for i in range(50)} == set(NOVEL_SHAPES)
    assert phrase("orange", "star") == "an orange star" and phrase("red", "circle", "small") == "a small red circle"
    with pytest.raises(BadInput):
        Shapes(shapes=["blob"])


def test_shape_only_captions():
    """The bootstrap's captions: the same pictures, named by their shapes alone."""
    full, bare = Shapes(size=32, seed=2), Shapes(size=32, seed=2, shape_only=True)
    for i in range(200):
        a, b = full.scene(i), bare.scene(i)
        assert a.things == b.things
        assert b.caption == " and ".join(phrase("", t.shape) for t in a.things)
    with pytest.raises(BadInput):
        Shapes(pair_p=1.5)
