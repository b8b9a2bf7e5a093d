"""`convret demo` runs end to end on a small CSIT batch and reports all three methods."""
from convret.cli import main


def test_demo_small(capsys):
    assert main(["demo", "--batch", "1", "--session-len", "40", "--response-len", "12", "--q-heads", "4",
                 "--kv-heads", "2", "--head-dim", "32", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for method in ("| convret |", "| dense-mask eager |", "| SDPA + dense bool mask |"):
        assert method in out
    max_error = float(out.split("max |convret - dense eager| = ")[1].split()[0])
    assert max_error < 1e-5


def test_unknown_command(capsys):
    assert main(["train-everything"]) == 2
    err = capsys.readouterr().err
    assert "usage" in err and "train-everything" in err


def test_help_lists_every_command(capsys):
    from convret.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out
