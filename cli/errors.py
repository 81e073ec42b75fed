"""One clear line on stderr instead of a traceback, for every command of the CLI."""
from __future__ import annotations

import sys
from functools import wraps

import click

from edgediff.runtime.errors import EdgediffError


def user_errors(command):
    """Turn EdgediffError into one line on stderr and exit status 1 (Ctrl-C: 130)."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgediffError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper
