"""The ``bitlab`` command.  Each subcommand is a module ``cmd_<name>.py`` in this package
defining ``register(subparsers)``; new commands need no edit elsewhere."""
