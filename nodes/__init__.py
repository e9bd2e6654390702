"""Edge Agent Mesh: everything that runs on a device (daemon, backends, hardware probe, announcer).

Nothing under `nodes` imports Ray or the coordinator.
"""

import logging

logger = logging.getLogger("nodes")
