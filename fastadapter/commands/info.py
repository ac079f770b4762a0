"""``fastadapter info``: the backends available on this machine, and which CPU kernel variant runs."""
HELP = "print which attention backends run here (and the CPU kernel variant), and why the others don't"


def add_arguments(parser) -> None:
    del parser  # no options


def run(args) -> int:
    from ..info import main
    return main()
