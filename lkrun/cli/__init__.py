"""The `lkrun` command line: one module per command group."""

from __future__ import annotations

import importlib
import warnings

from lkrun.cli.common import app

# Each module registers its commands; --help lists them in this order.
for _module in ("serve", "dispatch", "status", "jobs", "recover", "protocol"):
    importlib.import_module(f"lkrun.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    # PyJWT warns on every token signed with a short secret, such as the dev server's;
    # the secret's length is the server's configuration, not something to repeat per token.
    warnings.filterwarnings("ignore", message="The HMAC key is", category=UserWarning)
    app()
