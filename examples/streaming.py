"""Streaming: usage is read from the stream itself, and a stream you abandon is still charged.

Moonshot sends a stream's usage inside its final chunk. kimi-budget watches the bytes as they
pass (your code sees the SDK's usual chunks, unchanged) and records the exact usage when the
stream ends. If you stop reading early, the server still bills what it generated: the call is
recorded as "abandoned" with an estimated cost instead of $0.

    python examples/streaming.py       # offline; --live calls Moonshot with MOONSHOT_API_KEY
"""

from __future__ import annotations

from decimal import Decimal

from _moonshot import moonshot

from kimi_budget import Budget, OpenAI

NANOS_PER_USD = 1_000_000_000
MESSAGES = [{"role": "user", "content": "Write two sentences about the sea."}]


def show(client: OpenAI, what: str) -> None:
    call = client.ledger.calls(1)[0]
    cost = Decimal(call["cost_nanos"]) / NANOS_PER_USD
    estimated = " (estimated)" if call["estimated"] else ""
    print(
        f"{what}: status {call['status']}, {call['prompt_tokens']} in / "
        f"{call['completion_tokens']} out, ${cost:f}{estimated}"
    )


def main() -> None:
    # The stand-in sends one chunk every 5 ms, as a real stream arrives over time.
    with moonshot(chunk_delay=0.005) as connection:
        client = OpenAI(**connection, budget=Budget(daily="1"), tags={"example": "streaming"})

        stream = client.chat.completions.create(
            model="kimi-k2.6", messages=MESSAGES, max_tokens=200, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        show(client, "read to the end")

        stream = client.chat.completions.create(
            model="kimi-k2.6", messages=MESSAGES, max_tokens=200, stream=True
        )
        for seen, _chunk in enumerate(stream, start=1):
            if seen == 3:
                break
        stream.close()  # stop reading: the server has already generated (and billed) tokens
        show(client, "closed after 3 chunks")
        print(f"total recorded: ${client.ledger.spend(tags={'example': 'streaming'}):f}")
        client.close()


if __name__ == "__main__":
    main()
