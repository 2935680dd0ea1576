"""``kimi-budget report --html FILE``: one self-contained page, checked as text and in a browser.

The browser is Debian's ``chromium``, headless (``.ci/run`` installs it), with every host name
unresolvable (nothing leaves the machine, chromium's own update checks included). The test wants
no console message and no uncaught error, no request for anything but the file itself (from
chromium's network log), and a screenshot whose chart is really drawn (the models' colours are
there, in quantity). Where chromium is missing outside CI, the browser tests are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget.cli import cli
from kimi_budget.cli._html import MARKER, PALETTE
from tests.test_cli import at, record

NANOS = 1_000_000_000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium here (apt-get install chromium); CI installs it and never skips",
)


@pytest.fixture
def month(ledger_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Ten days of calls: two models, two tags, cache hits, one estimated call."""
    rows = []
    with kb.Ledger(ledger_path) as ledger:
        for day in range(1, 11):
            rows.append(
                record(
                    ledger,
                    at(2026, 11, day, 9),
                    prompt=20_000 * day,
                    cached=5_000 * day,
                    completion=400,
                    tags={"team": "research" if day % 2 else "support"},
                )
            )
            if day % 3 == 0:
                rows.append(
                    record(
                        ledger,
                        at(2026, 11, day, 15),
                        model="kimi-k2-thinking",
                        prompt=30_000,
                        completion=2_000,
                        tags={"team": "support", "job": "nightly"},
                        estimated=day == 9,
                    )
                )
    return ledger_path, rows


def write_page(ledger: Path, page: Path, *extra: str, **env: str) -> Any:
    return CliRunner().invoke(
        cli, ["report", "--ledger", str(ledger), "--html", str(page), *extra], env=env
    )


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_page_has_every_part_and_exact_figures(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, rows = month
    page = tmp_path / "spend.html"
    result = write_page(ledger, page, KIMI_BUDGET_DAILY_USD="0.05", KIMI_BUDGET_MONTHLY_USD="3")
    assert result.exit_code == 0, result.output
    assert f"Wrote {page}" in result.output
    text = page.read_text(encoding="utf-8")
    parsed = _Collect()
    parsed.feed(text)
    words = " ".join(" ".join(parsed.text).split())
    for heading in (
        "Spend per day, by model",
        "Caps now",
        "Spend by tag",
        "Cache savings",
        "The most expensive calls",
    ):
        assert heading in words
    total = sum(r["cost"] for r in rows)
    saved = sum(r["saved"] for r in rows)
    assert f"${_exact(total)}" in words and f"${_exact(saved)}" in words
    # One bar segment per (day, model) with spend: 10 days of kimi-k2.5, 3 of the other.
    assert len(re.findall(r"<rect [^>]*><title>2026-11-\d\d kimi-k2", text)) == 13
    # Both caps drawn: the daily one as a line across the chart, the monthly one as a gauge.
    assert re.search(r"<line [^>]*stroke-dasharray[^>]*><title>daily cap: \$0\.05</title>", text)
    assert "monthly cap" in words and f"${_exact(total)}" in words
    # By tag: team and job, each value with its calls and spend.
    research = sum(r["cost"] for r in rows if r["tags"].get("team") == "research")
    assert re.search(rf"research</td><td class=num>5</td><td class=num>\${_exact(research)}<", text)
    assert "nightly" in words
    # The most expensive call first.
    costliest = max(rows, key=lambda r: r["cost"])
    assert words.index(f"${_exact(costliest['cost'])}") < words.index("The most expensive") + 400
    assert "(estimated)" in words


def test_the_page_needs_nothing_from_anywhere(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, _ = month
    page = tmp_path / "spend.html"
    assert write_page(ledger, page).exit_code == 0
    text = page.read_text(encoding="utf-8")
    parsed = _Collect()
    parsed.feed(text)
    assert parsed.tags["script"] == 0 and parsed.tags["img"] == 0 and parsed.tags["iframe"] == 0
    assert parsed.tags["svg"] >= 1
    for name, value in parsed.attrs:
        if name in ("src", "href", "action", "poster") and value is not None:
            assert value.startswith("data:"), (name, value)
    # No URL anywhere but the SVG namespace (a name, never fetched).
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}
    assert "@import" not in text and "url(" not in text


def test_an_empty_ledger_still_makes_a_page(ledger_path: Path, tmp_path: Path) -> None:
    kb.Ledger(ledger_path).close()
    page = tmp_path / "empty.html"
    result = write_page(ledger_path, page)
    assert result.exit_code == 0, result.output
    assert "No settled calls match." in page.read_text(encoding="utf-8")


def test_a_file_kimi_budget_did_not_write_is_never_replaced(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, _ = month
    theirs = tmp_path / "notes.html"
    theirs.write_text("<p>my notes</p>", encoding="utf-8")
    result = write_page(ledger, theirs)
    assert result.exit_code == 2
    assert "was not written by kimi-budget" in result.output and str(theirs) in result.output
    assert theirs.read_text(encoding="utf-8") == "<p>my notes</p>"
    # Its own page, written earlier, is replaced.
    ours = tmp_path / "spend.html"
    assert write_page(ledger, ours).exit_code == 0
    first = ours.read_text(encoding="utf-8")
    assert MARKER in first
    assert write_page(ledger, ours, "--model", "kimi-k2-thinking").exit_code == 0
    assert ours.read_text(encoding="utf-8") != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".html") == [
        "notes.html",
        "spend.html",
    ]  # no temporary file left behind


def test_a_missing_folder_is_named(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, _ = month
    result = write_page(ledger, tmp_path / "no" / "such" / "spend.html")
    assert result.exit_code == 2
    assert f"the folder {tmp_path / 'no' / 'such'} does not exist" in result.output
    assert not (tmp_path / "no").exists()


# -- in a real browser ---------------------------------------------------------------------------


def _chromium(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "chromium is missing: .ci/run installs it (apt-get install)"
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Nothing resolves, and every request is written to the network log.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--log-net-log={tmp_path / 'netlog.json'}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            # Half-size pixels: a 500 x 450 screenshot, quick to decode, the chart still whole.
            "--window-size=1000,900",
            "--force-device-scale-factor=0.5",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def console_messages(stderr: str) -> list[str]:
    """Console output and uncaught errors, as headless chromium logs them to stderr."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


# Chromium asks its own services (updates, time, accounts) whatever the page is: not the page's.
_BROWSER_OWN = re.compile(r"^https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gstatic\.com)/")


def page_requests(tmp_path: Path) -> set[str]:
    """The URLs the page asked for, from chromium's network log (file: and data: excepted)."""
    log = (tmp_path / "netlog.json").read_text(encoding="utf-8", errors="replace")
    urls = set(re.findall(r'"url":"([^"]+)"', log))
    return {
        url
        for url in urls
        if not url.startswith(("file:", "data:", "chrome:", "about:"))
        and not _BROWSER_OWN.match(url)
    }


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB or RGBA PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    pixels = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        pixels += [tuple(line[i : i + 3]) for i in range(0, stride, channels)]  # type: ignore[misc]
        previous = line
    return width, height, pixels  # type: ignore[return-value]


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


@needs_browser
def test_the_page_loads_in_a_browser_without_errors_and_draws_the_chart(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, _ = month
    page = tmp_path / "spend.html"
    assert write_page(ledger, page, KIMI_BUDGET_DAILY_USD="0.05").exit_code == 0
    shot = tmp_path / "spend.png"
    run = _chromium(page.as_uri(), tmp_path, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_messages(run.stderr) == []
    assert page_requests(tmp_path) == set()
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (500, 450)
    counts = Counter(pixels)
    # Not blank: the two models' bar colours and the cap's red cover real areas.
    assert counts[_rgb(PALETTE[0])] > 2_000, counts.most_common(5)
    assert counts[_rgb(PALETTE[1])] > 300, counts.most_common(5)
    assert counts[_rgb("#C0392B")] > 15  # the dashed cap line, one pixel thick at half size
    # The DOM the browser built holds the chart and the tables.
    dom = _chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert "<svg" in dom.stdout and "The most expensive calls" in dom.stdout


@needs_browser
def test_the_browser_checks_can_fail(tmp_path: Path) -> None:
    """The same checks see a console error, a fetch from the network, and a blank page."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.com/x.css">'
        '</head><body><script>console.error("drawn wrong")</script></body></html>',
        encoding="utf-8",
    )
    shot = tmp_path / "bad.png"
    run = _chromium(bad.as_uri(), tmp_path, f"--screenshot={shot}")
    assert "drawn wrong" in "\n".join(console_messages(run.stderr))
    assert page_requests(tmp_path) == {"https://cdn.example.com/x.css"}
    counts = Counter(png_pixels(shot.read_bytes())[2])
    assert counts[_rgb(PALETTE[0])] == 0 and len(counts) == 1  # blank: one colour


def _exact(nanos: int) -> str:
    from decimal import Decimal

    return format((Decimal(nanos) / NANOS).normalize(), "f")


# -- two currencies ------------------------------------------------------------------------------


def _cny_call(ledger: kb.Ledger, when: Any, prompt: int, completion: int) -> int:
    """A call billed in CNY (api.moonshot.cn), kimi-k2.6 at ¥1.10 / ¥6.50 / ¥27.00 per million."""
    import uuid
    from datetime import timedelta

    from kimi_budget.ledger import Reservation, Settlement

    hit, miss, out = 1_100, 6_500, 27_000  # nano-yuan per token
    reservation = Reservation(
        call_id=uuid.uuid4().hex,
        model="kimi-k2.6",
        tags={"team": "china"},
        created_at=when,
        expires_at=when + timedelta(hours=1),
        projected_nanos=prompt * miss + 1000 * out,
        prompt_estimate=prompt,
        price_cache_hit=hit,
        price_cache_miss=miss,
        price_output=out,
        currency="CNY",
    )
    ledger.reserve(reservation)
    cost = prompt * miss + completion * out
    ledger.settle(
        Settlement(
            reservation=reservation,
            status="ok",
            prompt_tokens=prompt,
            cached_tokens=0,
            completion_tokens=completion,
            cost_nanos=cost,
            estimated=False,
            attempts=1,
            finished_at=when + timedelta(seconds=1),
        )
    )
    return cost


def test_usd_and_cny_are_shown_apart_never_added(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, rows = month
    with kb.Ledger(ledger) as opened:
        yuan = sum(_cny_call(opened, at(2026, 11, day, 11), 40_000, 900) for day in (2, 4))
    dollars = sum(r["cost"] for r in rows)
    page = tmp_path / "spend.html"
    assert write_page(ledger, page).exit_code == 0
    parsed = _Collect()
    parsed.feed(page.read_text(encoding="utf-8"))
    words = " ".join(" ".join(parsed.text).split())
    assert "USD spent" in words and "CNY spent" in words
    assert f"spent ${_exact(dollars)}" in words and f"spent ¥{_exact(yuan)}" in words
    assert f"${_exact(dollars + yuan)}" not in words
    # The terminal chart: one per currency, each with its own totals.
    chart = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--by", "day", "--chart"])
    assert chart.exit_code == 0, chart.output
    assert "UTC, USD)" in chart.output and "UTC, CNY)" in chart.output
    assert "¥" in chart.output.split("UTC, CNY)")[1]
    assert "¥" not in chart.output.split("UTC, CNY)")[0]


def test_the_report_keeps_currencies_apart(
    month: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ledger, rows = month
    with kb.Ledger(ledger) as opened:
        yuan = _cny_call(opened, at(2026, 11, 2, 11), 40_000, 900)
    dollars = sum(r["cost"] for r in rows)
    text = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--by", "total"])
    assert text.exit_code == 0, text.output
    assert "(UTC, USD)" in text.output and "(UTC, CNY)" in text.output
    assert f"${_exact(dollars)}" in text.output and f"¥{_exact(yuan)}" in text.output
    mixed = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--json"])
    assert mixed.exit_code == 2 and "--currency" in mixed.output
    import json

    for code, amount in (("CNY", yuan), ("usd", dollars)):
        result = CliRunner().invoke(
            cli, ["report", "--ledger", str(ledger), "--json", "--currency", code]
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["currency"] == code.upper() and data["total_usd"] == _exact(amount)


def test_a_tag_with_many_values_is_cut_to_the_costliest(ledger_path: Path, tmp_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        rows = [
            record(ledger, at(2026, 11, 1, 9), prompt=1000 * (n + 1), tags={"job": f"j{n:02d}"})
            for n in range(40)
        ]
    page = tmp_path / "spend.html"
    assert write_page(ledger_path, page).exit_code == 0
    text = page.read_text(encoding="utf-8")
    shown = re.findall(r"<tr><td>(j\d\d)</td>", text)
    assert shown == [f"j{n:02d}" for n in range(39, 24, -1)]  # the 15 costliest, in order
    rest = sum(r["cost"] for r in rows[:25])
    assert re.search(
        rf"25 more values</td><td class=num>25</td><td class=num>\${_exact(rest)}<", text
    )
