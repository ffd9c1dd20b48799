"""Submits plan.yaml under a fresh prefix and prints each work package's outcome.

    REDIS_URL=redis://127.0.0.1:PORT GE_ADMIN_URL=http://127.0.0.1:HTTP_PORT python submit_plan.py
"""

from __future__ import annotations

import os
import sys
import time

from ge_orchestrator import SyncProducer

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    prefix = f"py{time.strftime('%H%M%S')}."
    with SyncProducer() as p:
        subs = p.submit_plan(os.path.join(HERE, "plan.yaml"), prefix=prefix)
        print(f"submitted {', '.join(s.wp_id for s in subs)}", flush=True)
        outcomes = p.wait(subs, timeout=120)
    for o in outcomes.values():
        print(f"{o.wp_id}: {o.status} after {o.attempts} attempt(s): {o.result if o.ok else o.error}")
    sys.exit(0 if all(o.ok for o in outcomes.values()) else 1)
