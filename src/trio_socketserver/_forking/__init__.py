# ForkingMixIn and its worker-process pool: sync request handlers in reused worker processes.
# The code of three kinds of process lives here, one file per job (the list, and the engine
# internals the mixin relies on, open _mixin.py); this file only gathers the public names.
"""Worker processes for sync request handlers: ``ForkingMixIn`` (see ``_mixin``)."""

from __future__ import annotations

from ._mixin import WORKER_RELEASE_TIMEOUT as WORKER_RELEASE_TIMEOUT
from ._mixin import ForkingMixIn as ForkingMixIn
from ._mixin import ForkingTCPServer as ForkingTCPServer
from ._mixin import ForkingUDPServer as ForkingUDPServer
from ._mixin import ForkingUnixDatagramServer as ForkingUnixDatagramServer
from ._mixin import ForkingUnixStreamServer as ForkingUnixStreamServer
from ._pool import FORK_SERVER_TIMEOUT as FORK_SERVER_TIMEOUT
from ._safety import FORK_SAFETY_MODES as FORK_SAFETY_MODES
from ._safety import ForkSafetyError as ForkSafetyError
from ._safety import ForkSafetyWarning as ForkSafetyWarning
from ._wire import WORKER_KILL_TIMEOUT as WORKER_KILL_TIMEOUT
