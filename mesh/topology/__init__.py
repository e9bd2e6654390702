"""The topology: what a mesh should look like, read from a YAML file.

Public API (everything else is internal):

    load_topology(path) -> Topology            # raises mesh.core.errors.ConfigError listing every problem
    parse_topology(text, source="x.yaml") -> Topology
    check_topology_text(text, source=...) -> (Topology | None, [TopologyProblem])
    default_topology() -> Topology             # no file: one local device, bundled smollm2

A `ConfigError` from the loader carries `fields["problems"]`: a tuple of `TopologyProblem`
(file, path, message, line, column), each printing as `FILE: nodes[1].port: must be 1..65535 (line 14)`.

The models (`Topology`, `NodeSpec`, `ModelSpec`, `UpstreamSpec`, `AgentSpec`, `RoutingSpec`,
`FailoverSpec`, `CoordinatorSpec`, `DiscoverySpec`, `EscalationSpec`) are frozen and forbid unknown keys; see
`mesh/topology/model.py` for every field, its unit and default. Shipped examples: `topologies/`.
"""

from mesh.topology.loader import (
    TopologyProblem,
    check_topology_text,
    load_topology,
    parse_topology,
)
from mesh.topology.model import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_MODEL_PACKAGE,
    POLICY_NAMES,
    AgentSpec,
    ClusterSpec,
    CoordinatorSpec,
    DiscoverySpec,
    EscalationSpec,
    FailoverSpec,
    ModelSpec,
    NodeSpec,
    RoutingSpec,
    Topology,
    UpstreamSpec,
    default_topology,
    split_address,
)

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "DEFAULT_MODEL_PACKAGE",
    "POLICY_NAMES",
    "AgentSpec",
    "ClusterSpec",
    "CoordinatorSpec",
    "DiscoverySpec",
    "EscalationSpec",
    "FailoverSpec",
    "ModelSpec",
    "NodeSpec",
    "RoutingSpec",
    "Topology",
    "TopologyProblem",
    "UpstreamSpec",
    "check_topology_text",
    "default_topology",
    "load_topology",
    "parse_topology",
    "split_address",
]
