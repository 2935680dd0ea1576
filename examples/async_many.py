"""Many concurrent calls under one cap, with AsyncOpenAI.

Each call reserves its worst-case cost before it is sent, in the same SQLite transaction that
checks the cap, so concurrent calls (or processes) can never overshoot it together. When the
cap cannot cover another worst case, the call is refused before sending: BudgetExceededError.

    python examples/async_many.py      # offline; --live calls Moonshot with MOONSHOT_API_KEY
"""

from __future__ import annotations

import asyncio
import secrets

from _moonshot import moonshot

from kimi_budget import AsyncOpenAI, Budget, BudgetExceededError

CALLS = 60
CONCURRENCY = 10
CAP = "0.005"


async def main() -> None:
    # The stand-in answers after 20-80 ms, so that calls really overlap.
    with moonshot(latency=(0.02, 0.08)) as connection:
        job = secrets.token_hex(4)
        client = AsyncOpenAI(
            **connection,
            # One cap for this job: only calls tagged with its id count against it.
            budget=Budget(total=CAP, scope={"job": job}),
            tags={"example": "async", "job": job},
        )
        gate = asyncio.Semaphore(CONCURRENCY)
        in_flight = peak = 0

        async def ask(n: int) -> str:
            nonlocal in_flight, peak
            async with gate:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    response = await client.chat.completions.create(
                        model="kimi-k2.6",
                        messages=[{"role": "user", "content": f"Give me fact number {n}."}],
                        max_tokens=150,
                    )
                    return response.choices[0].message.content or ""
                finally:
                    in_flight -= 1

        results = await asyncio.gather(*(ask(n) for n in range(CALLS)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, BudgetExceededError)]
        failed = [r for r in results if isinstance(r, BaseException) and r not in refused]
        answered = CALLS - len(refused) - len(failed)
        spent = client.ledger.spend(tags={"job": job})
        print(f"{CALLS} calls, up to {peak} at once, under one cap of ${CAP}:")
        print(f"  answered {answered}, refused before sending {len(refused)}, failed {len(failed)}")
        within = "within" if spent <= client.budgets[0].caps["total"] else "OVER"
        print(f"  spent ${spent:f} of ${CAP}: {within} the cap")
        if refused:
            print(
                f"  each call in flight holds its worst case (${refused[0].projected_usd:f}) until "
                f"it settles at its real cost (${spent / max(answered, 1):.7f} on average)"
            )
            print(f"  first refusal: {refused[0]}")
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
