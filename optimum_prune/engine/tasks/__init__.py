"""The kinds of work a prune does to a decoder layer, one module each (`base.Task` is the
protocol). ``TASK_KINDS`` is the registry: the plan asks every kind that ``applies`` for its tasks,
and a layer's kinds are solved in this order. Adding a kind = one module with a `Task` subclass,
and its class added here."""

from .base import LayerRun, Task
from .channel_group import GroupTask
from .expert_bank import ExpertTask
from .expert_channels import ExpertChannelTask
from .expert_drop import ExpertDropTask
from .linear import LinearTask


TASK_KINDS: tuple[type[Task], ...] = (LinearTask, ExpertTask, GroupTask, ExpertChannelTask, ExpertDropTask)

__all__ = ["TASK_KINDS", "ExpertChannelTask", "ExpertDropTask", "ExpertTask", "GroupTask", "LayerRun", "LinearTask",
           "Task"]
