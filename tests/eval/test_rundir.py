import json

import pytest

from hf_flexoffload.eval.rundir import RecordWriter, RunDirectory, read_records

SPEC = {"scenario": {"name": "s"}, "model": "m"}


def test_partial_last_record_is_dropped_then_cut_before_appending(tmp_path):
    path = tmp_path / "instances.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "compl')
    assert [r["id"] for r in read_records(str(path))] == ["a", "b"]
    with RecordWriter(str(path)) as writer:
        writer.append([{"id": "c"}])
    assert [r["id"] for r in read_records(str(path))] == ["a", "b", "c"]


def test_a_different_run_is_refused(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    run.prepare(SPEC, resume=False)
    with pytest.raises(ValueError, match=r"different run .*\['model'\]"):
        run.prepare({**SPEC, "model": "other"}, resume=True)


def test_finished_records_need_resume(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    run.prepare(SPEC, resume=False)
    run.prepare(SPEC, resume=False)  # nothing finished yet: starting again is fine
    with RecordWriter(run.shard_path(0, 1)) as writer:
        writer.append([{"id": "a"}])
    with pytest.raises(FileExistsError, match="--resume"):
        run.prepare(SPEC, resume=False)
    run.prepare(SPEC, resume=True)


def test_merge_orders_dedups_and_removes_shards(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    run.prepare(SPEC, resume=False)
    for rank, ids in ((0, ["c", "a"]), (1, ["b", "a"])):
        with RecordWriter(run.shard_path(rank, 2)) as writer:
            writer.append([{"id": i, "rank": rank} for i in ids])
    merged = run.merge(["a", "b", "c"])
    assert [(r["id"], r["rank"]) for r in merged] == [("a", 0), ("b", 1), ("c", 0)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "instances.jsonl",
        "run_spec.json",
    ]
    assert json.loads((tmp_path / "run" / "run_spec.json").read_text()) == SPEC
