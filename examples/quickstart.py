"""Quick start: the one-line migration.

    - from openai import OpenAI
    + from kimi_budget import OpenAI, Budget

Every chat completion is now checked before it is sent (context window, worst-case cost against
each cap), reserved while in flight, and recorded exactly in a local SQLite ledger.

    python examples/quickstart.py      # offline; --live calls Moonshot with MOONSHOT_API_KEY
"""

from __future__ import annotations

from decimal import Decimal

from _moonshot import moonshot

from kimi_budget import Budget, OpenAI

NANOS_PER_USD = 1_000_000_000


def main() -> None:
    with moonshot() as connection:
        # The budget could come from KIMI_BUDGET_DAILY_USD=1 or kimi-budget.toml instead.
        client = OpenAI(
            **connection,
            budget=Budget(per_call="0.05", daily="1"),
            tags={"example": "quickstart"},
        )
        response = client.chat.completions.create(
            model="kimi-k2.6",
            messages=[{"role": "user", "content": "Say hello in five words."}],
            max_tokens=200,
        )
        print("reply:", response.choices[0].message.content)

        call = client.ledger.calls(1)[0]  # the ledger keeps exact integer nano-dollars
        cost = Decimal(call["cost_nanos"]) / NANOS_PER_USD
        reserved = Decimal(call["projected_nanos"]) / NANOS_PER_USD
        print(
            f"recorded: {call['prompt_tokens']} in / {call['completion_tokens']} out = ${cost:f} "
            f"(${reserved:f} was reserved before sending: the worst case)"
        )
        for cap in client.ledger.status(client.budgets[0]):
            if cap.window == "per_call":
                print(f"per-call cap ${cap.limit_usd:f}: no single call may risk more")
            else:
                print(
                    f"{cap.window} cap ${cap.limit_usd:f}: ${cap.spent_usd:f} spent, "
                    f"${cap.remaining_usd:f} left, resets {cap.resets_at:%Y-%m-%d %H:%M} UTC"
                )
        print("ledger:", client.ledger.path)
        client.close()


if __name__ == "__main__":
    main()
