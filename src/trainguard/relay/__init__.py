"""The job side of `trainguard serve`: a durable, bounded spool of ledger events and the thread that
delivers it, so a job's evidence reaches the server without the job holding database credentials.

from trainguard.relay import Delivery, Spool

with Spool.open("r42") as spool:                     # $TRAINGUARD_HOME/spool/, one file per run
    delivery = Delivery(spool, "https://tg.example", token)   # a job token of run r42
    spool.put(new_event("monitor.alert", {...}, run_id="r42"))
    delivery.close()                                 # sends what is left, waits a bounded time

Standard library only, standing on the ledger's events: importing it imports no HTTP framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

if TYPE_CHECKING:
    from trainguard.relay._delivery import Delivery, DeliveryLimits
    from trainguard.relay._spool import GAP_EVENT, Spool, SpooledEvent, SpoolFull, SpoolLimits

__all__ = ["GAP_EVENT", "Delivery", "DeliveryLimits", "Spool", "SpoolFull", "SpoolLimits", "SpooledEvent"]

_HOMES = {
    **dict.fromkeys(("Delivery", "DeliveryLimits"), "_delivery"),
    **dict.fromkeys(("GAP_EVENT", "Spool", "SpoolFull", "SpoolLimits", "SpooledEvent"), "_spool"),
}

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
