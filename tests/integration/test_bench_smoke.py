"""Smoke test of the benchmarks (devtools/bench.py) at tiny sizes: structure, never timings.

The figures in docs/benchmarks.md come from `make bench`; here the same functions run against the
session's Azurite and stand-in, with the app in its own process, and only the structural results
are checked: no webhook errors, the design's per-event Marketplace calls, every InProgress
operation answered, nothing left to repair afterwards; reconciliation writes exactly the drifted
subscriptions plus the summary, and its reads are page scans, not one read per subscription; every
console page answers, a page view writes nothing and reads a bounded number of pages (no scan
proportional to the subscriptions), and a search by id is one point read.
"""

from __future__ import annotations

import pytest

from devtools import bench

pytestmark = pytest.mark.azurite


@pytest.fixture
def environment(azurite, standin):
    with bench.BenchEnvironment(azurite=azurite, standin=standin) as environment:
        yield environment


def test_classify_storage_request():
    base = "http://127.0.0.1:10002/devstoreaccount1"
    assert bench.classify_storage_request("GET", f"{base}/tsubscriptions(PartitionKey='a',RowKey='state')") == "point_read"
    assert bench.classify_storage_request("PUT", f"{base}/tsubscriptions(PartitionKey='a',RowKey='state')") == "update"
    assert bench.classify_storage_request("PATCH", f"{base}/tsubscriptions(PartitionKey='a',RowKey='op%7C1')") == "update"
    assert bench.classify_storage_request("GET", f"{base}/tsubscriptions()?$filter=RowKey%20eq%20'state'") == "query_page"
    assert bench.classify_storage_request("POST", f"{base}/tsubscriptions") == "insert"
    assert bench.classify_storage_request("POST", f"{base}/$batch") == "transaction"
    assert bench.classify_storage_request("POST", f"{base}/Tables") == "table_admin"
    assert bench.classify_storage_request("POST", "http://127.0.0.1:10001/devstoreaccount1/events/messages") == "queue_send"
    assert bench.storage_target(f"{base}/tsubscriptions(PartitionKey='a',RowKey='state')") == "tsubscriptions"
    assert bench.storage_target(f"{base}/truns()?$filter=x") == "truns"
    assert bench.storage_target("http://127.0.0.1:10001/devstoreaccount1/events/messages") == "events"


def test_webhook_actions_follow_the_mix():
    actions = bench.webhook_actions(20)
    assert len(actions) == 20
    assert actions.count("ChangeQuantity") == 5 and actions.count("Reinstate") == 2
    assert actions[:2] != ["ChangeQuantity", "ChangeQuantity"]  # interleaved, not in blocks


def test_webhook_burst_structure(environment):
    result = bench.bench_webhook(environment, events=20, senders=5, auth_samples=20)

    assert result["errors"] == 0, result["statuses"]
    assert sum(result["results"].values()) == 20
    assert result["setup_recorded"] >= 20
    # The design's Marketplace calls: one Get Operation per event, one PATCH per InProgress event.
    assert result["marketplace_calls"].get("get_operation") == 20
    assert result["marketplace_calls"].get("update_operation", 0) == result["answered_events"] > 0
    assert result["patches"] == result["answered_events"]
    assert set(result["patch_statuses"]) == {"Success"}
    # The delivery jobs are counted as the relay's, not the request's: each event reaches the events queue once.
    assert result["relay_storage_wire"].get("queue_send") == 20
    # At least the design's minimum storage work: each new event is written once, in one transaction.
    assert result["storage_wire"].get("transaction") == 20
    assert result["storage_writes_per_event"] >= bench.MIN_STORAGE_WRITES
    assert result["storage_reads_per_event"] >= bench.MIN_STORAGE_READS
    # The wire count and the repository's own metrics agree.
    assert result["repo_reads_per_event"] == result["storage_reads_per_event"]
    assert result["repo_writes_per_event"] == result["storage_writes_per_event"]
    # Each probe ran alone: a plain event is one Get Operation, an InProgress one adds the PATCH.
    probes = {probe["label"]: probe for probe in result["probes"]}
    assert probes["Suspend"]["marketplace"] == {"get_operation": 1}
    assert probes["ChangeQuantity"]["marketplace"] == {"get_operation": 1, "patch_operation": 1}
    assert probes["duplicate (redelivery)"]["result"] == "duplicate"
    assert probes["duplicate (redelivery)"]["marketplace"] == {}
    assert probes["duplicate (redelivery)"]["writes"] == 0
    assert all(probe["status"] == 200 for probe in result["probes"])
    # JWT validation was timed and the local state equals Microsoft's after the burst.
    assert result["auth_alone_ms"]["samples"] == 20
    assert 0 < result["auth_alone_share_of_handle"] < 1
    assert result["consistency_repairs"] == {} and result["consistency_completed"]


def test_reconcile_writes_and_reads(environment):
    run = bench.bench_reconcile(environment, subscriptions=150, memory=False)
    drift, clean = run["drift_run"], run["clean_run"]

    assert run["setup"]["recorded"] == 150
    assert run["drifted"] == 2 and sum(run["drift_kinds"].values()) == 2
    assert drift["completed"] and clean["completed"]
    assert drift["subscriptions_seen"] == clean["subscriptions_seen"] == 150
    # Writes: the drifted subscriptions plus the summary; a run with nothing to do writes the summary only.
    assert drift["repairs_total"] == run["drifted"]
    assert drift["storage_writes"] == run["drifted"] + 1
    assert clean["storage_writes"] == 1 and clean["repairs_total"] == 0
    # Reads are page scans (+ the checkpoint), not one per subscription: 150 subscriptions, 1 scan page.
    pages = clean["wire"].get("query_page", 0)
    assert pages == 1
    assert clean["wire"].get("point_read", 0) == 1  # the checkpoint
    assert clean["storage_reads"] == pages + 1
    # Only a drifted subscription costs a point read of its own (its current ETag before the write).
    assert drift["storage_reads"] == clean["storage_reads"] + run["drifted"]
    # Marketplace: the list pages, plus List operations for each subscription suspended at Microsoft.
    assert clean["pages"] == 2  # stand-in pages of 100
    assert clean["marketplace_calls"] == clean["pages"] + run["drift_kinds"].get("status", 0)


def test_coldstart_parses_importtime():
    rows = bench.parse_importtime(
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   json.decoder\n"
        "import time:       246 |       1346 | function_app\n"
    )
    assert rows == [("json.decoder", 100, 100, 1), ("function_app", 246, 1346, 0)]


def test_metering_structure(environment):
    result = bench.bench_metering(environment, events=600, subscriptions=20, reporters=4)

    assert result["statuses"] == {"202": result["calls"]}  # no event had to be sent again
    assert result["accepted_events"] == 600
    # Every bucket reached Microsoft once, in the fewest calls, and nothing was lost or added.
    assert result["microsoft_events"] == result["buckets"] == 20 * 3 * 3
    assert result["emission_calls"] == result["emission_minimum_calls"] == 8
    assert result["exact"] and result["reported_total"] == result["accepted_total"]
    assert result["emission_summary"]["accepted"] == result["buckets"]
    assert result["second_run_calls"] == 0 and result["second_run_pending"] == 0
    # Ingest writes rows in transactions per hour shard: fewer writes than events, never more than two each.
    assert 0 < result["storage_writes_per_event"] <= 2


def test_metering_variant_shuffled_with_item_errors_still_bills_every_unit(environment):
    result = bench.bench_metering(environment, events=600, subscriptions=20, reporters=4, order="shuffled", error_rate=0.2)

    assert result["item_errors_answered"] > 0 and result["first_run_item_errors"] > 0
    assert result["first_run_unmatched"] == 0  # shuffled results are matched by their key fields
    assert result["retry_calls"] > 0 and result["second_run_pending"] == 0
    assert result["exact"] and result["microsoft_events"] == result["buckets"]


def test_readback_structure(environment):
    result = bench.bench_readback(environment, subscriptions=10, days=2)

    assert result["rows"] == 10 * 3 * 2
    assert (result["differences"], result["rejected"]) == (3, 1)  # the three planted rows, each found
    assert result["matched"] == result["rows"] - 3
    assert result["marketplace_calls"] == {"usage_events": 1}
    assert result["second_run_events_written"] == 0  # a difference is reported once


def test_console_page_views_are_bounded(environment):
    result = bench.bench_console(environment, subscriptions=200, loads=2)
    pages = {page["key"]: page for page in result["pages"]}

    assert [page["key"] for page in result["pages"] if page.get("missing")] == []
    assert result["setup_recorded"] == 200 and sum(result["counts"].values()) == 200
    assert result["counts"][bench.CONSOLE_RARE_STATUS] == bench.CONSOLE_RARE  # counted by the run, shown by the list
    for page in pages.values():
        assert page["statuses"] == {"200": 2}, page["label"]
        assert page["storage_writes"] == 0 and page["relay"] == {}, page["label"]  # a page view writes nothing
    # The first page: one filtered query page of the subscriptions table and the last run summary, not a scan
    # of the 200 subscriptions; the next page (the continuation token as cursor) costs the same.
    for key in ("list_first", "list_next"):
        assert set(pages[key]["storage"]) == {"query_page"} and pages[key]["storage"]["query_page"] <= 2, key
        assert pages[key]["by_table"].get("subscriptions query_page") == 1, key
        assert pages[key]["rows"] == 50, key
    assert pages["list_first"]["next_page"]
    assert pages["status_rare"]["rows"] == bench.CONSOLE_RARE
    assert pages["status_rare"]["storage"].get("query_page", 0) <= 2
    # A search by subscription id is one point read (and no query of the subscriptions table).
    assert pages["search_id"]["rows"] == 1
    assert pages["search_id"]["by_table"].get("subscriptions point_read") == 1
    assert "subscriptions query_page" not in pages["search_id"]["by_table"]
    assert pages["search_text"]["rows"] == 1
    # Microsoft is asked only by the subscription page, once.
    assert pages["subscription"]["marketplace"] == {"get_subscription": 1}
    assert [key for key, page in pages.items() if page["marketplace"] and key != "subscription"] == []
    assert result["table_rows"]["state"] == 200
    assert result["scan_probe"]["rows"] == 200  # the SDK-alone read of the rows a text search reads


def test_work_queue_section_structure(environment):
    """Section 7: the dev host serves the queue triggers; every event arrives, every change settles."""
    result = bench.bench_queues(environment, events=6, senders=3, changes=4, callers=2)
    for sinks, run in result["delivery"].items():
        assert run["statuses"] == {"200": 6} and run["all_delivered"], (sinks, run)
        assert run["to_queue_ms"]["count"] == 6 and run["request_work_queue_sends"] == 6
        # one job per event, received and deleted by the host, delivered once to the events queue
        assert run["relay_wire"]["queue_delete"] == 6 and run["relay_wire"]["queue_send"] == 6
    assert result["delivery"]["queue"]["to_hook_ms"] is None
    assert result["delivery"]["queue_and_hook"]["to_hook_ms"]["count"] == 6
    assert set(result["followup"]) == {"webhook", "polls_only", "webhook_paced", "polls_only_paced"}
    for path, run in result["followup"].items():
        changes = result["paced_changes"] if path.endswith("_paced") else 4
        assert run["statuses"] == {"202": changes} and run["all_settled"], (path, run)
        assert run["endings"] == {"Succeeded": changes} and run["to_settled_ms"]["count"] == changes
    assert bench._render_queues(result)[0].startswith("## 7.")
