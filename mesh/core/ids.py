"""Distinct id types, so a node id is never passed where a model id belongs."""

from __future__ import annotations

import uuid
from typing import NewType

NodeId = NewType("NodeId", str)
TaskId = NewType("TaskId", str)


def new_task_id() -> TaskId:
    return TaskId(f"task-{uuid.uuid4().hex[:16]}")


def new_node_id() -> NodeId:
    return NodeId(uuid.uuid4().hex[:12])
