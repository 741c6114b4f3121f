"""``edgesaga fleet``: one line per device sharing a broker (not built yet)."""

from __future__ import annotations

import argparse
from typing import Any


async def cmd_fleet(args: argparse.Namespace) -> int:
    """The handler of ``edgesaga fleet``."""
    raise NotImplementedError("edgesaga fleet is not built yet")


def add_fleet_parser(subparsers: Any) -> None:
    """Add ``edgesaga fleet`` to the CLI's sub-command parsers."""
    sp = subparsers.add_parser("fleet", help="one line per device on a broker (not built yet)")
    sp.add_argument("--broker", required=True, metavar="HOST[:PORT]")
    sp.set_defaults(func=cmd_fleet)
