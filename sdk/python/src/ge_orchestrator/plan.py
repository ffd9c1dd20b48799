"""Work packages and plans: the YAML that ``ge-orchestrator submit`` reads, read the same way.

.. code-block:: yaml

    work_packages:
      - wp_id: spec
        agent_id: dolly            # or work_type / trigger, as in the contract
        lane: backend              # optional
        depends_on: [other-wp]     # optional
        payload: { any: yaml }     # text is sent as is, anything else as JSON
        fields: { extra: value }   # passed through to the trigger

Unknown keys are refused, as the CLI refuses them. A work package's entry has the same fields,
in the same order, as the CLI sends, so the same plan sent by either is the same work (the
orchestrator compares all fields of a resubmitted ``wp_id``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml  # type: ignore[import-untyped, unused-ignore]

__all__ = ["WorkPackage", "Plan", "PlanError", "is_valid_wp_id", "payload_text"]

_WP_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def is_valid_wp_id(wp_id: str) -> bool:
    """``[A-Za-z0-9._:-]{1,128}``, the contract's form of a ``wp_id``."""
    return bool(_WP_ID.match(wp_id))


class PlanError(ValueError):
    """A plan file that cannot be read; the message names the file and the place."""


def payload_text(payload: Any) -> Optional[str]:
    """A payload as the CLI sends it: text as is, anything else as compact JSON with sorted
    keys (serde_json's form)."""
    if payload is None:
        return None
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


@dataclass
class WorkPackage:
    """One work package of a plan (``fields`` are extra fields passed through)."""

    wp_id: str
    agent_id: Optional[str] = None
    work_type: Optional[str] = None
    trigger: Optional[str] = None
    lane: Optional[str] = None
    depends_on: List[str] = field(default_factory=list)
    payload: Any = None
    fields: Dict[str, str] = field(default_factory=dict)

    def entry(self) -> List[Tuple[str, str]]:
        """The incoming entry's fields, in the CLI's order."""
        out: List[Tuple[str, str]] = [("wp_id", self.wp_id)]
        for k in ("agent_id", "work_type", "trigger", "lane"):
            v = getattr(self, k)
            if v is not None:
                out.append((k, v))
        if self.depends_on:
            out.append(("depends_on", ",".join(self.depends_on)))
        text = payload_text(self.payload)
        if text is not None:
            out.append(("payload", text))
        out.extend(sorted(self.fields.items()))
        return out


_KEYS = {"wp_id", "agent_id", "work_type", "trigger", "lane", "depends_on", "payload", "fields"}


def _scalar_text(v: Any) -> Optional[str]:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)
    return None


@dataclass
class Plan:
    work_packages: List[WorkPackage]

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "Plan":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PlanError(f"reading plan {path}: {e}") from e
        return cls.parse(text, source=path)

    @classmethod
    def parse(cls, text: str, source: str = "<plan>") -> "Plan":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"{source}: {e}") from e
        return cls.from_dict(doc, source)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<plan>") -> "Plan":
        def bad(why: str) -> PlanError:
            return PlanError(f"{source}: {why}")

        if not isinstance(doc, Mapping):
            raise bad("a plan is a mapping with the key work_packages")
        extra = set(doc) - {"work_packages"}
        if extra:
            raise bad(f"unknown field {sorted(map(str, extra))[0]!r}, expected work_packages")
        items = doc.get("work_packages")
        if not isinstance(items, list):
            raise bad("missing field work_packages (a list)")
        wps: List[WorkPackage] = []
        for i, item in enumerate(items):
            where = f"work_packages[{i}]"
            if not isinstance(item, Mapping):
                raise bad(f"{where}: a work package is a mapping")
            unknown = set(item) - _KEYS
            if unknown:
                raise bad(f"{where}: unknown field {sorted(map(str, unknown))[0]!r}, expected one of {', '.join(sorted(_KEYS))}")
            wp_id = item.get("wp_id")
            if not isinstance(wp_id, str):
                raise bad(f"{where}: missing field wp_id (text)")
            kw: Dict[str, Any] = {"wp_id": wp_id}
            for k in ("agent_id", "work_type", "trigger", "lane"):
                v = item.get(k)
                if v is not None:
                    t = _scalar_text(v)
                    if t is None:
                        raise bad(f"{where}.{k}: expected text")
                    kw[k] = t
            deps = item.get("depends_on") or []
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise bad(f"{where}.depends_on: expected a list of wp_ids")
            kw["depends_on"] = list(deps)
            kw["payload"] = item.get("payload")
            fields = item.get("fields") or {}
            if not isinstance(fields, Mapping):
                raise bad(f"{where}.fields: expected a mapping of field to text")
            out: Dict[str, str] = {}
            for k, v in fields.items():
                t = _scalar_text(v)
                if t is None:
                    raise bad(f"{where}.fields.{k}: expected text")
                out[str(k)] = t
            kw["fields"] = out
            wps.append(WorkPackage(**kw))
        return cls(wps)

    def with_prefix(self, prefix: str) -> "Plan":
        """Every wp_id and dependency prefixed, so one plan can be submitted again as new work
        (``submit --prefix``)."""
        return Plan(
            [replace(w, wp_id=prefix + w.wp_id, depends_on=[prefix + d for d in w.depends_on]) for w in self.work_packages]
        )

    def wp_ids(self) -> List[str]:
        return [w.wp_id for w in self.work_packages]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.work_packages)

    def __len__(self) -> int:
        return len(self.work_packages)


PlanLike = Union[Plan, str, "os.PathLike[str]", Sequence[WorkPackage]]
