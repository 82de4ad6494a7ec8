"""`cscope ARGS` for torchrun, except that rank 1 SIGKILLs itself after finishing its first
activation shard: a rank that dies mid-run, as an OOM-killed or preempted worker would.

Usage: torchrun --nproc-per-node 2 tests/torchrun_kill_rank.py extract
"""

import os
import signal
import sys

from conceptscope_cli.extract import store

if os.environ.get("RANK") == "1":
    _close = store.ShardWriter.close

    def _close_then_die(self, **kwargs):  # noqa: ANN001, ANN003, ANN202
        _close(self, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    store.ShardWriter.close = _close_then_die

from conceptscope_cli.cli.app import main  # noqa: E402

sys.argv = ["cscope", *sys.argv[1:]]
main()
