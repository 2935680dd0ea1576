"""Each backend's schema as numbered migrations, applied when a ledger is opened.

One module per backend (``_sqlite``, ``_postgres``); applied migrations are recorded by name in
the ledger itself (``_kimi_budget_migrations``), so a newer kimi-budget upgrades an older
ledger in place and never re-runs a step.
"""
