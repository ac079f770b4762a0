"""``fastadapter info``: the backends available on this machine."""
HELP = "print which attention backends run here, and why the others don't"


def add_arguments(parser) -> None:
    del parser  # no options


def run(args) -> int:
    from ..info import main
    return main()
