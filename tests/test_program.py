"""rca_fast.utils.program.run_program, the one __main__ wrapper of the programs: a usage error is one
line on stderr and exit 2, a program's own exits keep their codes, anything else keeps its traceback."""
import pytest

from rca_fast.utils.program import run_program


class Interrupted(Exception):
    pass


def raising(exc):
    def main():
        raise exc
    return main


@pytest.mark.parametrize("exc",
                         [ValueError("--lr must be > 0, got -1"), FileNotFoundError("list.txt not found")])
def test_usage_errors_exit_2_with_one_line(capsys, exc):
    with pytest.raises(SystemExit) as info:
        run_program(raising(exc))
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_program_exits_checked_first_and_keep_their_codes(capsys):
    exits = [(Interrupted, 130, "stopped"), (FloatingPointError, 1, "error")]
    with pytest.raises(SystemExit) as info:
        run_program(raising(Interrupted("at step 4")), exits)
    assert info.value.code == 130 and capsys.readouterr().err == "stopped: at step 4\n"
    with pytest.raises(SystemExit) as info:
        run_program(raising(FloatingPointError("non-finite loss")), exits)
    assert info.value.code == 1 and capsys.readouterr().err == "error: non-finite loss\n"
    # a kind listed in exits wins over the usage rule (a ValueError subclass with its own code)
    class Special(ValueError):
        pass
    with pytest.raises(SystemExit) as info:
        run_program(raising(Special("x")), [(Special, 3, "special")])
    assert info.value.code == 3 and capsys.readouterr().err == "special: x\n"


def test_other_exceptions_propagate_and_success_returns(capsys):
    with pytest.raises(KeyError):
        run_program(raising(KeyError("a bug")))
    with pytest.raises(ImportError):   # not a usage error unless the program lists it
        run_program(raising(ImportError("no pydensecrf")))
    calls = []
    assert run_program(lambda: calls.append(1)) is None and calls == [1]
    assert capsys.readouterr().err == ""
