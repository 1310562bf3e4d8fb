"""Mixture of Experts: router -> dispatch (sort by expert) -> grouped experts -> combine."""

from models.moe.balance import router_entropy, router_z_loss, routing_stats, switch_aux_loss
from models.moe.dispatch import DispatchPlan, expert_capacity, moe_forward, plan_dispatch
from models.moe.experts import GroupedExperts, grouped_mm_supported
from models.moe.layer import LayerRouting, MoEConfig, MoEFFN, MoELayer, layer_routing
from models.moe.reference import reference_moe
from models.moe.router import Router, RouterOutput

__all__ = [
    "DispatchPlan",
    "GroupedExperts",
    "LayerRouting",
    "MoEConfig",
    "MoEFFN",
    "MoELayer",
    "Router",
    "RouterOutput",
    "expert_capacity",
    "grouped_mm_supported",
    "layer_routing",
    "moe_forward",
    "plan_dispatch",
    "reference_moe",
    "router_entropy",
    "router_z_loss",
    "routing_stats",
    "switch_aux_loss",
]
