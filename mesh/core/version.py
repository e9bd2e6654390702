"""The project's version and the protocol version that nodes and coordinators must share."""

from __future__ import annotations

__version__ = "0.1.0"
# Carried in every node's TXT record (`v`) and `Describe`; a coordinator ignores nodes of another.
PROTOCOL_VERSION = 1
