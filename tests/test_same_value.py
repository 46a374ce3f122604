"""validate.same_value: how a matrix's [[exclude]], [[override]], [[difference]] and --only match
a cell's typed value against text (a command line, a CSV, MLflow) or another typed value."""

import pytest

from harness import validate


@pytest.mark.parametrize("value, wanted, same", [
    (0.1, "0.1", True), ("0.1", 0.1, True), (2, "2", True), (2, "2.5", False),
    (True, "true", True), (True, 1, False), (1, True, False), (False, "False", True),
    (None, "none", True), (None, "", True), (None, "0", False),
    ([16, 32], "16,32", True), ([16, 32], "[16, 32]", True), ((16, 32), [16, 32], True), ([16, 32], "16", False),
    ("osr", "osr", True), ("osr", "tab", False), (938, 938, True),
])
def test_same_value_reads_text_as_the_other_sides_type(value, wanted, same):
    assert validate.same_value(value, wanted) is same
