"""A batch job that stops cleanly when its budget runs out.

The job gets its own cap (a ``total`` budget scoped to the job's id). Before each call the
worst case is checked against what is left; when it no longer fits, the call is refused
*before* anything is sent, and the job stops with a summary instead of a traceback, having
spent no more than its cap.

    python examples/batch_job.py       # offline; --live calls Moonshot with MOONSHOT_API_KEY
"""

from __future__ import annotations

import secrets

from _moonshot import moonshot

from kimi_budget import Budget, BudgetExceededError, OpenAI

JOB_CAP = "0.003"
DOCUMENTS = [
    f"Document {n}: minutes of meeting {n} of the allotment society, on water, tools and "
    f"the plot waiting list (item {n % 7})."
    for n in range(1, 41)
]


def main() -> int:
    job = f"summaries-{secrets.token_hex(3)}"
    with moonshot() as connection:
        client = OpenAI(
            **connection,
            budget=Budget(total=JOB_CAP, scope={"job": job}),
            tags={"example": "batch", "job": job},
        )
        summaries: list[str] = []
        stopped: BudgetExceededError | None = None
        for document in DOCUMENTS:
            try:
                response = client.chat.completions.create(
                    model="kimi-k2.6",
                    messages=[
                        {"role": "system", "content": "Summarise in one line."},
                        {"role": "user", "content": document},
                    ],
                    max_tokens=120,
                )
            except BudgetExceededError as exc:
                stopped = exc  # nothing was sent for this document; the job ends here
                break
            summaries.append(response.choices[0].message.content or "")

        spent = client.ledger.spend(tags={"job": job})
        print(f"job {job}: summarised {len(summaries)} of {len(DOCUMENTS)} documents")
        print(f"spent ${spent:f} of its ${JOB_CAP} cap")
        if stopped is not None:
            print(f"stopped cleanly: the budget ran out. {stopped}")
            print(f"resume from document {len(summaries) + 1} with a new cap.")
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
