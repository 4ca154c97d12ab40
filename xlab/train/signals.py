"""Stop requests for a training run: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop
after the step in progress and save; a second one acts at once."""

from __future__ import annotations

import signal
import threading
from typing import Optional

from xlab.errors import Terminated


class Interrupt:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the step, save, stop. A second one: the default
    behaviour at once (KeyboardInterrupt, or termination). ``signum`` is the signal that asked."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested, self.signum = True, signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    def raise_stop(self) -> None:
        """After the save: KeyboardInterrupt for SIGINT, :class:`~xlab.errors.Terminated` for SIGTERM."""
        raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
