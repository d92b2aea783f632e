"""`m1 data ...` subcommands (filled in by the data-curation work)."""


def register(sub) -> None:
    p = sub.add_parser("data", help="data curation")
    p.add_subparsers(dest="data_command", required=True)
