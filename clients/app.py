"""fedllm ClientApp: fine-tune the global LoRA adapter on this site's data with DP-SGD.

The site's data comes from its node config: ``data-file`` (plus ``text-column`` /
``label-column`` / ``test-fraction``) and ``state-dir`` in deployment, or ``partition-id`` /
``num-partitions`` in simulation. The site's policy (``clients.policy``) is checked before any
step: its lifetime ε cap over every run in its ledger, its δ cap, DP required unless it opts
out. Under DP only the adapter and the privacy numbers leave; failures reach the server as
fixed codes. The site's privacy state lives in its ledger (``<state-dir>/privacy_ledger.json``)
and, within a run, in ``context.state``, both under the run key the server sends (``run-key``,
stable when a crashed run is resumed; Flower's run id from a server that sends none).

A round this site already trained, asked again with the same global adapter (a resumed run),
is answered with the reply it kept (``clients.replay``): no step, no new ε.

The handlers' work is in ``clients.handlers``, imported with the first message that needs it:
Flower starts a ClientApp process for each message, and torch, transformers and peft take
seconds to import on a small CPU, so a SecAgg+ stage the mods answer (``clients.secagg``) starts
in a fraction of that.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.bookkeeping import book_releases
from clients.pin import pinned_app
from clients.policy import failures_as_codes
from clients.secagg import secagg_mod

# pinned_app: clients/pin.py (refuses runs of other apps first); secagg_mod: clients/secagg.py
app = ClientApp(mods=[failures_as_codes, pinned_app, secagg_mod, book_releases])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round at this site: check its policy, book the spend, DP-train locally, reply
    (``clients.handlers.train``)."""
    from clients import handlers  # torch, transformers, peft: for a message that trains

    return handlers.train(msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's local test split, if the site releases that
    (``clients.handlers.evaluate_global``)."""
    from clients import handlers

    return handlers.evaluate_global(msg, context)
