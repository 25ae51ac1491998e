"""The engine's step loop never sleeps through work (issue 12's condition wait).

A request joins through the inbox and a kick. An iteration that only lands the step in flight
(it may not launch while the inbox holds a request) takes the kick without taking the inbox;
the loop then went to sleep with the request still in the inbox and nothing to wake it: a
follow-up turn sent the moment its previous turn ended hung forever (seen in
test_kv_tiers, one run in several). A request in the inbox is work by itself now.
"""

from __future__ import annotations

import asyncio

from deployments.engine import SamplingParams
from deployments.engine.paged.sequence import Sequence
from deployments.engine.token_stream import TokenStream
from tests.cpu.test_kv_shares import paged_engine


def test_a_request_in_the_inbox_runs_even_when_its_kick_was_taken():
    engine = paged_engine(None)  # the builtin tiny model, shares off

    async def main() -> list[int]:
        stream = TokenStream(asyncio.get_running_loop())
        seq = Sequence(
            request_id="r",
            user_key=None,
            token_ids=[65, 66, 67, 68],
            sampling=SamplingParams(4, temperature=0.0, ignore_eos=True),
            stream=stream,
        )
        with engine._wake:  # the state that iteration left: inbox full, no kick pending
            engine._inbox.append(seq)
            engine._kicked = False
            engine._wake.notify()

        async def tokens() -> list[int]:
            return [t async for batch in stream for t in batch]

        return await asyncio.wait_for(tokens(), 20)

    try:
        assert len(asyncio.run(main())) == 4
    finally:
        asyncio.run(engine.shutdown())
