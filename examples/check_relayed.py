"""Compares what a producer committed with what the relay published (a `file:` publisher's JSON
Lines). Standard library only, so it runs without the examples' venv.

    python3 check_relayed.py EXPECTED.jsonl RELAYED.jsonl

Checks that every committed event was published exactly once (a clean drain sends no duplicates),
that nothing else was published, that each event arrived with its type, key, payload and headers,
and that the events of each key arrived in the order they were committed, with increasing `seq`.
Exits 1 naming every difference.
"""

import json
import sys


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(expected_path, relayed_path):
    expected = read_lines(expected_path)
    relayed = read_lines(relayed_path)
    problems = []
    if not expected:
        problems.append(f"{expected_path} lists no events: the producer committed nothing")

    by_id = {}
    for event in relayed:
        if event["id"] in by_id:
            problems.append(f"event {event['id']} published twice")
        by_id[event["id"]] = event
    expected_ids = {e["id"] for e in expected}
    for event_id in by_id.keys() - expected_ids:
        problems.append(f"event {event_id} published but never committed by the producer")

    for want in expected:
        got = by_id.get(want["id"])
        if got is None:
            problems.append(f"event {want['id']} ({want['aggregate_id']} {want['event_type']}) not published")
            continue
        for field in ("aggregate_type", "aggregate_id", "event_type", "payload", "headers"):
            if got.get(field) != want[field]:
                problems.append(f"event {want['id']}: {field} is {got.get(field)!r}, committed {want[field]!r}")

    # Per key: the committed order, and the order of publication (with its seq).
    committed_order, published_order = {}, {}
    for e in expected:
        committed_order.setdefault((e["aggregate_type"], e["aggregate_id"]), []).append(e["id"])
    for e in relayed:
        published_order.setdefault((e["aggregate_type"], e["aggregate_id"]), []).append((e["id"], e["seq"]))
    for key, ids in committed_order.items():
        published = published_order.get(key, [])
        if [i for i, _ in published] != ids:
            problems.append(f"key {key[0]}/{key[1]}: published in the order {[i for i, _ in published]}, committed {ids}")
        seqs = [s for _, s in published]
        if seqs != sorted(seqs):
            problems.append(f"key {key[0]}/{key[1]}: seq not increasing in publication order: {seqs}")

    if problems:
        print(f"{relayed_path}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    keys = len(committed_order)
    print(f"relayed {len(relayed)} events of {keys} keys: every committed event once, in order per key, payloads intact", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: check_relayed.py EXPECTED.jsonl RELAYED.jsonl", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
