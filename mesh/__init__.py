"""Edge Agent Mesh: the parts that span devices (client, discovery, routing, coordinator).

Importing `mesh` pulls in neither Ray nor a model runtime.
"""

from mesh.errors import (
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    MeshError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PermissionDeniedError,
    TaskFailedError,
    UnavailableError,
)

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION",
    "CancelledError",
    "ConfigError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "MeshError",
    "ModelLoadError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PermissionDeniedError",
    "TaskFailedError",
    "UnavailableError",
    "__version__",
]
