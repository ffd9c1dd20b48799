"""An agent process for the tests that kill or stop one: agent `worker` under the consumer
name GE_AGENT_CONSUMER. Its handler (sync, so it runs in a thread) marks the work package as
started in Redis (`test:started:{wp_id}` = the consumer), then sleeps AGENT_SLEEP seconds
(`hang`: an hour) and returns `done by {consumer}`."""

import logging
import os
import time

import redis

from ge_orchestrator import Agent, Trigger

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
consumer = os.environ["GE_AGENT_CONSUMER"]
sleep = os.environ.get("AGENT_SLEEP", "hang")


def handle(t: Trigger) -> str:
    r = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    r.set(f"test:started:{t.wp_id}", consumer)
    r.close()
    time.sleep(3600 if sleep == "hang" else float(sleep))
    return f"done by {consumer}"


Agent("worker", handle, claim_idle="2s", heartbeat_interval="300ms").run_sync()
