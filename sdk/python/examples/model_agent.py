"""Two agents that call a (fake, local) model: ``writer`` drafts, ``reviewer`` reviews.

    REDIS_URL=redis://127.0.0.1:PORT python model_agent.py

``MODEL_URL`` is the model's base URL; without it the fake model of fake_model.py is started
in a thread. Stops on SIGTERM or Ctrl-C, letting running calls finish and report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Dict

from ge_orchestrator import Agent, Fatal, Retryable, Trigger, run_agents

log = logging.getLogger("model_agent")


def chat(base_url: str, system: str, user: str) -> Dict[str, Any]:
    """One blocking call to the model (the handlers are sync, so each runs in a thread)."""
    body = json.dumps({"model": "fake", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        if e.code in (429, 500, 502, 503, 504):
            raise Retryable(f"the model answered {e.code}") from e  # the orchestrator retries later
        raise Fatal(f"the model refused the request: {e.code} {e.reason}") from e
    except OSError as e:
        raise Retryable(f"the model cannot be reached: {e}") from e


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_url = os.environ.get("MODEL_URL")
    if not model_url:
        from fake_model import serve_in_thread

        _, model_url = serve_in_thread()
        log.info("started the fake model at %s", model_url)

    def write(t: Trigger) -> Dict[str, Any]:
        brief = t.json() or {}
        if not brief.get("topic"):
            raise Fatal("the payload needs a topic")  # no point in retrying
        reply = chat(model_url, "You write short drafts.", f"Draft a note about {brief['topic']}")
        return {"draft": reply["choices"][0]["message"]["content"], "usage": reply["usage"]}

    def review(t: Trigger) -> Dict[str, Any]:
        reply = chat(model_url, "You review drafts.", f"Review the draft of work package {t.wp_id} in a {t.get('tone', 'neutral')} tone")
        return {"review": reply["choices"][0]["message"]["content"], "usage": reply["usage"]}

    # Both in one process; SIGTERM or Ctrl-C stops both, letting running calls report.
    asyncio.run(run_agents(Agent("writer", write, concurrency=4), Agent("reviewer", review)))


if __name__ == "__main__":
    main()
