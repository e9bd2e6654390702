"""Edge Agent Mesh: the parts that span devices (client, discovery, routing, coordinator).

Importing `mesh` pulls in neither Ray nor a model runtime.
"""

from mesh.core.errors import (
    AlreadyExistsError,
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
    RateLimitedError,
    TaskFailedError,
    UnauthenticatedError,
    UnavailableError,
)
from mesh.core.version import PROTOCOL_VERSION, __version__

__all__ = [
    "PROTOCOL_VERSION",
    "AlreadyExistsError",
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
    "RateLimitedError",
    "TaskFailedError",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
