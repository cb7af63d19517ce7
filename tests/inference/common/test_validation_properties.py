"""Property tests of the public validators: what they accept is returned unchanged, what they
refuse raises the documented error naming the argument."""

import math
import numbers

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vilab.inference.common.validation import check_positive_int, check_probability

names = st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True)


@given(value=st.integers(-(10**6), 10**6), minimum=st.integers(-100, 100), name=names)
def test_check_positive_int_accepts_exactly_the_ints_from_minimum(value, minimum, name):
    if value >= minimum:
        assert check_positive_int(value, name, minimum) == value
    else:
        with pytest.raises(ValueError, match=rf"^{name}: expected an int >= {minimum}; got {value}$"):
            check_positive_int(value, name, minimum)


@given(value=st.integers(0, 2**62), width=st.sampled_from([np.int32, np.int64, np.uint64]))
def test_check_positive_int_accepts_numpy_integers_as_python_ints(value, width):
    value = min(value, np.iinfo(width).max)
    checked = check_positive_int(width(value), "n", minimum=0)
    assert type(checked) is int and checked == value


@given(
    value=st.one_of(
        st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)
    ),
    name=names,
)
def test_check_positive_int_refuses_what_is_not_an_int_with_a_type_error(value, name):
    with pytest.raises(TypeError, match=rf"^{name}: expected an int >= 1; got {type(value).__name__} "):
        check_positive_int(value, name)


@given(value=st.floats(allow_nan=True, allow_infinity=True), name=names)
def test_check_probability_accepts_exactly_the_open_unit_interval(value, name):
    if 0.0 < value < 1.0:
        assert check_probability(value, name) == value
    else:
        with pytest.raises(ValueError, match=rf"^{name}: expected a number in \(0, 1\); got "):
            check_probability(value, name)


@given(
    value=st.one_of(
        st.fractions(), st.integers(-3, 3), st.floats(-2, 2).map(np.float32), st.floats(-2, 2).map(np.float64)
    )
)
def test_check_probability_takes_any_real_number_type_and_returns_a_float(value):
    inside = 0 < value < 1
    if inside:
        checked = check_probability(value, "p")
        assert type(checked) is float and math.isclose(checked, float(value))
    else:
        with pytest.raises(ValueError, match=r"^p: expected a number in \(0, 1\)"):
            check_probability(value, "p")


@given(value=st.one_of(st.text(max_size=3), st.none(), st.complex_numbers(), st.booleans()))
def test_check_probability_refuses_what_is_not_a_real_number(value):
    if isinstance(value, numbers.Real) and 0 < value < 1:  # bools are Real, but 0 and 1 are outside
        return
    with pytest.raises(ValueError, match=r"^p: expected a number in \(0, 1\)"):
        check_probability(value, "p")
