"""One module per `erasekit` subcommand; each defines register(subparsers, parent)."""
