"""``python -m ge_orchestrator submit PLAN.yaml [--prefix P] [--wait]``: the CLI's ``submit``
through this package (``REDIS_URL``; ``GE_ADMIN_URL`` for ``--wait``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import List, Optional

from .producer import Producer


async def _submit(args: argparse.Namespace) -> int:
    async with Producer(args.redis_url, admin_url=args.admin_url) as p:
        if args.wait and not p.admin_url:
            print("--wait needs --admin-url or GE_ADMIN_URL (a replica's HTTP address)", file=sys.stderr)
            return 2
        subs = await p.submit_plan(args.plan, prefix=args.prefix)
        first = subs[0].wp_id if subs else "-"
        last = subs[-1].wp_id if subs else "-"
        print(f"submitted {len(subs)} work packages to {p.names.incoming} ({first} .. {last})")
        if not args.wait:
            return 0
        outcomes = await p.wait(subs, timeout=args.timeout)
        bad = 0
        for o in outcomes.values():
            print(f"{o.wp_id:<32} {o.status:<12} {(o.result if o.ok else o.error) or ''}".rstrip()[:200])
            bad += not o.ok
        return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ge_orchestrator")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="send a plan's work packages to the incoming stream")
    s.add_argument("plan")
    s.add_argument("--prefix", default="")
    s.add_argument("--redis-url", default=None, help="default: REDIS_URL")
    s.add_argument("--wait", action="store_true", help="wait until every work package is finished")
    s.add_argument("--admin-url", default=None, help="a replica's HTTP address (default: GE_ADMIN_URL)")
    s.add_argument("--timeout", type=float, default=None)
    args = ap.parse_args(argv)
    return asyncio.run(_submit(args))


if __name__ == "__main__":
    sys.exit(main())
