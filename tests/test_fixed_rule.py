"""The fixed launch rule is the documented table (issue 23): for every shape class the compile
check uses, every dtype mode and SM count, the config each launcher picks (captured from its plan
on fake CUDA tensors) is the one ``kernels/fixed_rule_table.md`` lists.  A change of the rule must
change the table (``python -m rca_fast.profile compile --write-rule-table kernels/fixed_rule_table.md``),
where a reviewer sees it."""
import difflib

import pytest

pytest.importorskip("triton")
from rca_fast.kernels import fixed_rule  # noqa: E402
from rca_fast.profile.compile_mode import SHAPE_NAMES, _shape  # noqa: E402


def test_launchers_choose_the_configs_of_the_table():
    written = fixed_rule.read_table()
    chosen = fixed_rule.rule_rows({name: _shape(name) for name in SHAPE_NAMES})
    assert len(written) > 300
    diff = list(
        difflib.unified_diff(
            written, chosen, "kernels/fixed_rule_table.md", "the launchers", lineterm="", n=0
        )
    )
    assert not diff, "the launchers' fixed rule differs from the table:\n" + "\n".join(diff[:40])


def test_table_covers_every_kernel_at_every_shape_class():
    rows = [r.split(" | ") for r in fixed_rule.read_table()]
    kernels = {r[0].lstrip("| ") for r in rows}
    assert kernels == {"nce_lse", "nce_row", "nce_bwd", "map_fwd", "map_bwd", "attn_fwd", "attn_bwd_scores",
                       "attn_bwd_grads", "attn_sum_splits"}
    for kernel in kernels:
        assert {r[1] for r in rows if r[0].lstrip("| ") == kernel} == set(SHAPE_NAMES), kernel
