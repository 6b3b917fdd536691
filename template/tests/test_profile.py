"""trainer.profile=true: a window of steps profiled through Accelerate, a trace in the run folder, the top operators
and the data wait in the run's log."""

import json
import logging


def test_profiled_run_writes_a_trace_and_logs_the_top_operators(pkg, make_config, toy_overrides, tmp_path, caplog):
    window = ["trainer.profile=true", "trainer.profile_wait=1", "trainer.profile_steps=2", "trainer.max_steps=6"]
    with caplog.at_level(logging.INFO):
        pkg.loop.train(make_config(*toy_overrides, *window, "checks.enabled=false"), tmp_path)
    trace = json.loads((tmp_path / "profile" / "rank0.pt.trace.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # after 1 step of wait and 1 of warm-up
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "profile of steps 3-4" in logged and "% of their time waiting for data" in logged
    fraction = float(logged.split("% of their time waiting for data")[0].rsplit(" ", 1)[-1])
    assert 0 < fraction < 100
    assert "Self CPU" in logged and "aten::" in logged  # the operator table


def test_a_run_shorter_than_the_wait_says_nothing_was_profiled(pkg, make_config, toy_overrides, tmp_path, caplog):
    window = ["trainer.profile=true", "trainer.profile_wait=10", "trainer.max_steps=3", "checks.enabled=false"]
    pkg.loop.train(make_config(*toy_overrides, *window), tmp_path)
    assert not (tmp_path / "profile").exists()
    assert "nothing was profiled; lower trainer.profile_wait" in caplog.text
