"""CLI subcommands: each module defines register(app) and owns its commands."""
