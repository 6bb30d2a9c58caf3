"""Assembly and the process model: a `Config` becomes running layers, and stays so on reload.

The parts:
- `generation`: the backends, routes and shadow lanes one config builds, as one immutable
  `Generation`; a reload builds the next one and swaps it in whole;
- `instance`: one worker's `Instance`: listeners, the admin API, reload, the drain;
- `process`: `run()` in this process, `run_workers()` forking workers on one port, relaying
  signals and reporting readiness (`--ready-file`);
- `access_log` and `tls`: what the listener keeps across generations.

The names below are the package's public surface; the CLI, the demo and the tests use these.
"""

from shadowlane.app.access_log import AccessLogger
from shadowlane.app.generation import Generation, build_backend, build_generation
from shadowlane.app.instance import Instance, ListenError, ReadyHook, bound_address
from shadowlane.app.process import remove_ready_file, run, run_workers, write_ready_file
from shadowlane.app.tls import build_tls

__all__ = [
    "AccessLogger",
    "Generation",
    "Instance",
    "ListenError",
    "ReadyHook",
    "bound_address",
    "build_backend",
    "build_generation",
    "build_tls",
    "remove_ready_file",
    "run",
    "run_workers",
    "write_ready_file",
]
