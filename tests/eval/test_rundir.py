import json

import pytest

from hf_flexoffload.eval.rundir import RecordWriter, RunDirectory, RunInUseError, read_records

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
    with pytest.raises(ValueError, match="different run: model changed"):
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


def test_a_directory_in_use_by_another_process_is_refused(tmp_path):
    import subprocess
    import sys

    run = RunDirectory(str(tmp_path / "run"))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from hf_flexoffload.eval.rundir import RunDirectory; "
         "RunDirectory(sys.argv[1]).lock(); print('held', flush=True); time.sleep(60)",
         run.path],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"in use by a run still going \\(pid {holder.pid}"):
            run.lock()
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file stays, but no one holds it any more.
    assert (tmp_path / "run" / ".lock").exists()
    run.lock()
    run.lock()  # re-entrant in one process (the CLI holds it around evaluate, which locks too)
    run.unlock()
    run.unlock()
    assert not (tmp_path / "run" / ".lock").exists()
