"""The `devft` command line: main.main parses and dispatches; fleet, export and report hold their
subcommands. Sits on top of method/, engine/ and fleet/; nothing imports it.
"""
