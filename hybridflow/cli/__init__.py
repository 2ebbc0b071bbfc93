"""The ``hybridflow`` command: each subcommand a module with configure(parser) and main(args)."""
