"""Running the `masktok` command inside the test process."""

from masktok_peft.cli import main


def run_cli(capsys, *argv):
    """Run `masktok ARGV` in this process; return (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
