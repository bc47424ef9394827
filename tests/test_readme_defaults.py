"""The README's public / rca_fast / paper table ("Where rca_fast differs from the public code")
against the parser of ``python -m rca_fast.train`` and against the public code's values.

Read generically from the table: every `` `--flag=value` `` of the rca_fast column (a default;
after `` `--recipe=NAME` `` in a cell, under that recipe) must be what ``parse_args`` gives for a
``--dataset voc`` command line.  Oracle of the public code: :data:`PUBLIC_CODE`, the values
DESIGN §2 cites from the public code; each must be named in the rca_fast column under the
default recipe, its row's public cell must cite it, and where that row says "same" the default
must equal it.  A flag whose default is changed in both the parser and the table keeps passing.
"""
import math
import os
import re

import pytest

from rca_fast.utils.train_args import build_parser, parse_args

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
SECTION = "## Where rca_fast differs from the public code"

# DESIGN §2, "the method as the public code runs it" (VOC): flag -> the public code's value
PUBLIC_CODE = {
    "--backbone": "vgg16",                 # VGG16, dilated conv5, stride 8
    "--lr": 1e-3, "--weight_decay": 5e-4,  # SGD 0.9 nesterov, wd on every parameter
    "--batch_size": 8, "--decay_points": "5,10",
    "--bank-slots": 500, "--gamma": 0.99, "--bank-init": "randn", "--first-write": "ema",
    "--score-threshold": 0.7,              # sigmoid of the final-head score > 0.7
    "--temperature": 0.07, "--mixup-alpha": 8.0,
    "--prototypes": 10, "--kmeans-n-init": 10, "--prototype-init": "randn",
    "--aggregation-start-epoch": 2,        # randn prototypes in the first epoch, k-means from the second
    "--aggregation": "linear",             # matmul(q, k) / K * 20, no softmax
    "--coarse-weight": 0.4, "--contrast-weight": 0.01,
    "--contrast-start-epoch": 3,           # skipped while the 0-based epoch < 2
}
TOKEN = re.compile(r"`(--[A-Za-z][\w-]*)=([^`\s]+)`")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def table_rows():
    """[(point, public cell, rca_fast cell)] of the section's table, found by its header names."""
    with open(README) as f:
        text = f.read()
    assert SECTION in text, f"README has no section {SECTION!r}"
    lines = [ln for ln in text.split(SECTION, 1)[1].split("\n## ", 1)[0].splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header = [h.lower() for h in cells[0]]
    pub = next(i for i, h in enumerate(header) if "public" in h)
    ours = next(i for i, h in enumerate(header) if "rca_fast" in h)
    return [(r[0], r[pub], r[ours]) for r in cells[2:] if len(r) == len(header)]


def defaults_named(rows, default_recipe):
    """[(recipe, flag, README value, row)] of every `--flag=value` of the rca_fast column."""
    out = []
    for row in rows:
        recipe = default_recipe
        for flag, value in TOKEN.findall(row[2]):
            if flag == "--recipe":
                recipe = value
            else:
                out.append((recipe, flag, value, row))
    return out


def as_parsed(action, text):
    """The README's text of a value as the parser holds it (switches: on/off)."""
    if text in ("on", "off"):
        return text == "on"
    return action.type(text) if callable(action.type) else text


def equal(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
        )
    return a == b


def cites(cell, value):
    """Whether a public cell states ``value``: all its numbers appear, or the word does."""
    if isinstance(value, (int, float)):
        return any(math.isclose(float(n), value, rel_tol=1e-12) for n in NUMBER.findall(cell))
    if re.fullmatch(r"[\d,]+", value):
        numbers = {float(n) for n in NUMBER.findall(cell)}
        return all(float(v) in numbers for v in value.split(","))
    return value.lower() in cell.lower()


@pytest.fixture(scope="module")
def table():
    parser = build_parser()
    return parser, defaults_named(table_rows(), parser.get_default("recipe"))


def test_every_default_the_table_names_is_the_parsers(table, tmp_path):
    parser, named = table
    assert len(named) >= len(PUBLIC_CODE), f"only {len(named)} `--flag=value` defaults in the table"
    args = {}
    for recipe, flag, text, row in named:
        action = parser._option_string_actions.get(flag)
        assert action is not None, f"README row {row[0]!r} names {flag}, which python -m rca_fast.train lacks"
        if recipe not in args:
            args[recipe] = vars(parse_args(["--dataset", "voc", "--train_list", str(tmp_path / "l.txt"),
                                            "--recipe", recipe]))
        want, got = as_parsed(action, text), args[recipe][action.dest]
        assert equal(got, want), (f"README row {row[0]!r}: {flag}={text} under --recipe {recipe}, "
                                  f"the parser's default is {got!r}")


def test_the_public_column_cites_the_public_code(table):
    parser, named = table
    default = parser.get_default("recipe")
    first = {}
    for recipe, flag, text, row in named:
        if recipe == default:
            first.setdefault(flag, (text, row))
    missing = sorted(set(PUBLIC_CODE) - set(first))
    assert not missing, f"the README table names no default for {missing}"
    for flag, public in PUBLIC_CODE.items():
        text, (point, pub_cell, our_cell) = first[flag]
        assert cites(pub_cell, public), (
            f"row {point!r}: the public cell does not cite {flag}'s {public!r}: {pub_cell}"
        )
        if our_cell.lower().startswith("same"):
            ours = as_parsed(parser._option_string_actions[flag], text)
            assert equal(ours, public), (
                f"row {point!r} says 'same' but {flag}={text}, the public code's is {public!r}"
            )
