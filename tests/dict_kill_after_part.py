"""`cscope ARGS`, except that the process SIGKILLs itself right after writing its first latent part
(a `parts/part-*.h5` of `cscope dict`): an interrupted run, as a preempted job would be.

Usage: python tests/dict_kill_after_part.py dict
"""

import os
import signal
import sys

from conceptscope_cli.dictionary import sparse

_close = sparse.CSRWriter.close


def _close_then_die(self, attrs=None):  # noqa: ANN001, ANN202
    _close(self, attrs)
    if self.path.parent.name == "parts":
        os.kill(os.getpid(), signal.SIGKILL)


sparse.CSRWriter.close = _close_then_die

from conceptscope_cli.cli.app import main  # noqa: E402

sys.argv = ["cscope", *sys.argv[1:]]
main()
