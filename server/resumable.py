"""Flower's ``Strategy.start`` from a later round: a resumed run's rounds keep their real numbers.

A resumed run (server/resume.py) starts at round ``k + 1``; Flower's ``Strategy.start`` numbers its
rounds 1, 2, ...; ``ResumableStart`` shifts every round number Flower passes in by ``k``, so
train/evaluate messages (``server-round``), round records, ``evaluate_fn`` (checkpoints, run log)
and Flower's own ``[ROUND i/n]`` log lines (server/flower_log.py) carry the run's real numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from server.flower_log import real_round_numbers

if TYPE_CHECKING:  # a mixin: the Flower strategy it is mixed into comes after it
    _Strategy = Strategy
else:
    _Strategy = object


class ResumableStart(_Strategy):
    """Flower's ``Strategy.start`` with ``first_round``: a resumed run's rounds keep their real numbers.

    Mixed in before a Flower strategy (``AdapterFedAvg``, server/client_dp.py's ``ClientDPFedAvg``);
    the strategy adds ``round_offset`` to every round number Flower passes in.
    """

    round_offset = 0  # rounds done before this start (a resumed run)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's evaluate messages, with the run's real round number."""
        return super().configure_evaluate(  # type: ignore[safe-super]  # the strategy mixed in after
            server_round + self.round_offset, arrays, config, grid
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``start`` for rounds ``first_round`` .. ``num_rounds`` (the run's real numbers).

        With ``first_round > 1`` (a resume from checkpoint ``first_round - 1`` = ``initial_arrays``)
        the initial ``evaluate_fn(0, ...)`` call is skipped: that checkpoint is already logged.
        The ``Result``'s round keys count from 1 for this start.
        """
        if not 1 <= first_round <= num_rounds + 1:
            raise ValueError(f"first_round={first_round} is outside 1..{num_rounds + 1}")
        offset = first_round - 1

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if (server_round == 0 and offset) or evaluate_fn is None:
                return None
            return evaluate_fn(server_round + offset, arrays)

        self.round_offset = offset
        try:
            with real_round_numbers(offset, num_rounds):  # Flower's [ROUND i/n] lines: real numbers
                return super().start(
                    grid,
                    initial_arrays,
                    num_rounds - offset,
                    timeout,
                    train_config,
                    evaluate_config,
                    shifted if evaluate_fn else None,
                )
        finally:
            self.round_offset = 0
