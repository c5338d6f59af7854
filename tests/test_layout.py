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
