"""One module per `strata` subcommand, each with `add_parser(subparsers)` and `run(args) -> int`."""
