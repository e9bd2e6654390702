"""Finding nodes on the LAN: the mDNS TXT record schema and the browser."""

from mesh.core.records import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    MalformedRecordError,
    NodeRecord,
)

__all__ = ["PROTOCOL_VERSION", "SERVICE_TYPE", "MalformedRecordError", "NodeRecord"]
