"""A database URL's password never reaches a message: ``redact_url``."""

from __future__ import annotations

import pytest

from kimi_budget._redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ann:s3cret@db.example:5432/kb", "postgresql://ann:***@db.example:5432/kb"),
        ("postgres://ann:p%40ss%3Aw@db/kb", "postgres://ann:***@db/kb"),
        ("postgresql://ann@db/kb?password=s3cret", "postgresql://ann@db/kb?password=***"),
        (
            "postgresql://h1:5432,h2:5433/kb?sslmode=require&sslpassword=k3y&application_name=w",
            "postgresql://h1:5432,h2:5433/kb?sslmode=require&sslpassword=***&application_name=w",
        ),
        ("postgresql://ann@db/kb?sslmode=require", "postgresql://ann@db/kb?sslmode=require"),
        ("postgresql:///kb", "postgresql:///kb"),
    ],
)
def test_the_password_is_replaced_and_the_rest_kept(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_password_with_an_at_sign_does_not_leak_its_tail() -> None:
    shown = redact_url("postgresql://ann:pa@ss@db.example/kb")
    assert "pa" not in shown.split("@")[0].split(":", 2)[-1]
    assert "ss" not in shown and shown.endswith("@db.example/kb")
