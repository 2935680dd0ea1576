"""Per-tag budgets: one client, one ledger, a separate cap for each team.

A budget's ``scope`` is a set of tags; it applies to calls whose tags contain all of them (and
counts only the ledger rows that do). ``with_options(tags=...)`` gives a copy of the client that
tags its calls, sharing the ledger and the budgets.

The same budgets in kimi-budget.toml, without touching the code:

    [[budgets]]
    daily = "0.0006"
    scope = { team = "research" }

    [[budgets]]
    daily = "0.01"
    scope = { team = "support" }

    python examples/per_tag_budgets.py      # offline; --live calls Moonshot with MOONSHOT_API_KEY
"""

from __future__ import annotations

from _moonshot import moonshot

from kimi_budget import Budget, BudgetExceededError, OpenAI

BUDGETS = [
    Budget(daily="0.0006", scope={"team": "research"}),
    Budget(daily="0.01", scope={"team": "support"}),
]


def main() -> None:
    with moonshot() as connection:
        client = OpenAI(**connection, budget=BUDGETS, tags={"example": "per-tag"})
        teams = {
            "research": client.with_options(tags={"team": "research"}),
            "support": client.with_options(tags={"team": "support"}),
        }
        for round_ in range(1, 6):
            line = []
            for team, team_client in teams.items():
                try:
                    team_client.chat.completions.create(
                        model="kimi-k2.6",
                        messages=[{"role": "user", "content": f"Question {round_} from {team}."}],
                        max_tokens=100,
                    )
                    line.append(f"{team}: answered")
                except BudgetExceededError as exc:
                    line.append(f"{team}: REFUSED ({exc.window} cap ${exc.limit_usd:f})")
            print(f"round {round_}: " + ", ".join(line))

        print()
        for budget in BUDGETS:
            (daily,) = client.ledger.status(budget)
            team = budget.scope["team"]
            print(
                f"{team:>8}: ${daily.spent_usd:f} spent of ${daily.limit_usd:f} today, "
                f"${daily.remaining_usd:f} left"
            )
        client.close()


if __name__ == "__main__":
    main()
