"""The crawl benchmark runs end to end on a tiny sample and reports sane figures."""

from __future__ import annotations

from pipelines.civitai.bench import format_table, run_crawl_benchmark


def test_crawl_benchmark_small(tmp_path):
    (row,) = run_crawl_benchmark((200,), users=10, work=tmp_path)
    assert row.complete and row.requests > 0 and row.items > 0
    assert row.duplicate_keys == 0 and row.duplicate_items == 0
    # paced by the client's limiter: at most its burst (rate / 10) plus rate x elapsed time
    assert 0 < row.requests <= 200 / 10 + 200 * row.seconds
    assert row.requests_per_second == row.requests / row.seconds
    assert row.rate_limited == 0  # the client never exceeds the server's limit
    table = format_table([row])
    assert "share" in table and "200" in table
