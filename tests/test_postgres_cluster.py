"""The throwaway PostgreSQL cluster the tests, CI and benchmarks share (tests/pg_cluster.py)."""

from __future__ import annotations

import psycopg
import pytest

from tests.pg_cluster import Cluster, PostgresUnavailable, Server


def test_each_test_gets_a_new_empty_database(postgres_server: Server) -> None:
    first, second = postgres_server.create_database(), postgres_server.create_database()
    try:
        assert first != second
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
        with psycopg.connect(second) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
            assert tables == (0,)
    finally:
        postgres_server.drop_database(first)
        postgres_server.drop_database(second)


def test_a_restarted_cluster_keeps_its_port_and_its_data(postgres_server: Server) -> None:
    # A cluster of its own: restarting the shared one would cut other tests' connections.
    try:
        cluster = Cluster.temporary()
    except PostgresUnavailable as exc:
        pytest.skip(f"needs PostgreSQL's server binaries ({exc})")
    try:
        url = cluster.url_for("postgres")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        port = cluster.port
        cluster.restart()
        assert cluster.port == port
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        cluster.destroy()
