"""TriangleMix layout validation: bad values raise ValueError naming the value."""

import pytest

import tmjax


def test_defaults_match_the_reference_implementation():
    layout = tmjax.TriangleMix(16)
    assert (layout.n_init, layout.n_local, layout.n_last) == (8, 512, 128)
    assert not layout.is_triangle(15) and layout.is_triangle(16) and layout.is_triangle(31)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(switch_layer=-1), "switch_layer"),
        (dict(switch_layer=4, n_init=-1), "n_init"),
        (dict(switch_layer=4, n_local=0), "n_local"),
        (dict(switch_layer=4, n_last=-5), "n_last"),
        (dict(switch_layer=2.5), "switch_layer"),
        (dict(switch_layer=True), "switch_layer"),
    ],
)
def test_invalid_values_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tmjax.TriangleMix(**kwargs)


def test_switch_layer_beyond_the_model():
    tmjax.TriangleMix(30).check_layers(30)  # 30 of 30: every layer dense, allowed
    with pytest.raises(ValueError, match="switch_layer=31.*30 layers"):
        tmjax.TriangleMix(31).check_layers(30)


def test_vertical_slash_defaults_are_minference_trianglemix_budgets():
    vs = tmjax.VerticalSlash()
    assert (vs.vertical, vs.slash, vs.last_q, vs.force_vertical, vs.force_slash) == (1000, 6096, 64, 30, 100)
    assert vs.attention_at(0) is vs and vs.attention_at(99) is vs


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(vertical=-1, force_vertical=0), "vertical"),
        (dict(slash=0), "slash"),
        (dict(last_q=0), "last_q"),
        (dict(force_vertical=-2), "force_vertical"),
        (dict(force_slash=0), "force_slash"),
        (dict(vertical=10, force_vertical=11), "force_vertical .11. must be <= vertical .10."),
        (dict(slash=50, force_slash=100), "force_slash .100. must be <= slash .50."),
        (dict(vertical=2.0), "vertical"),
        (dict(last_q=True), "last_q"),
        (dict(selection="block"), "selection"),
    ],
)
def test_vertical_slash_invalid_values_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tmjax.VerticalSlash(**kwargs)


def test_shallow_layers_use_the_shallow_pattern():
    vs = tmjax.VerticalSlash(vertical=64, slash=128)
    layout = tmjax.TriangleMix(4, shallow=vs)
    assert [layout.attention_at(i) for i in range(6)] == [vs, vs, vs, vs, layout, layout]
    assert tmjax.TriangleMix(4).attention_at(3) is None  # dense below the switch layer
    with pytest.raises(ValueError, match="shallow"):
        tmjax.TriangleMix(4, shallow=dict(vertical=64))
