"""`lora-train --plan`: estimate peak device memory and RAM before loading any weights, and advise changes."""

from lora_cli.planning.advice import Advice, Budget, Change, advise
from lora_cli.planning.estimate import MemoryPlan, PlanSettings, estimate_memory, plan_preset
from lora_cli.planning.inventory import BaseInventory, read_inventory
from lora_cli.planning.parts import Part
from lora_cli.planning.report import format_advice, format_plan, plan_report
from lora_cli.units import format_size, parse_size

__all__ = [
    "Advice",
    "BaseInventory",
    "Budget",
    "Change",
    "MemoryPlan",
    "Part",
    "PlanSettings",
    "advise",
    "estimate_memory",
    "format_advice",
    "format_plan",
    "format_size",
    "parse_size",
    "plan_preset",
    "plan_report",
    "read_inventory",
]
