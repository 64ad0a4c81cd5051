"""The run folder's log: train.jsonl takes every event but progress ticks; loss.png is redrawn with the
evaluations, at most every PLOT_EVERY_S seconds, and always for the last one, the end and close."""

from __future__ import annotations

import json

from gptcli.training import run_folder


def _eval(step: int, final: bool = False) -> dict:
    return {"event": "eval", "step": step, "train_loss": 3.0 - step / 100, "val_loss": 3.1 - step / 100,
            "tokens_seen": step * 64, "final": final}


def test_the_plot_is_redrawn_at_most_every_interval_and_at_the_end(tmp_path, monkeypatch):
    drawn: list[list[int]] = []
    monkeypatch.setattr("gptcli.plot.plot_losses", lambda evals, path: drawn.append([e["step"] for e in evals]))
    clock = [100.0]
    monkeypatch.setattr(run_folder.time, "monotonic", lambda: clock[0])
    log = run_folder.RunLog(tmp_path)

    log.record({"event": "step", "step": 0})
    log.record(_eval(0))  # the first is drawn at once
    clock[0] += 1
    log.record(_eval(10))  # 1 s later: waits
    log.record({"event": "checkpoint", "step": 10})
    assert drawn == [[0]]
    clock[0] += run_folder.PLOT_EVERY_S
    log.record(_eval(20))  # the interval has passed: every evaluation so far
    clock[0] += 1
    log.record(_eval(25, final=True))  # the last evaluation is drawn however soon
    assert drawn == [[0], [0, 10, 20], [0, 10, 20, 25]]
    log.record({"event": "end", "step": 25})
    log.close()
    assert len(drawn) == 3  # nothing new to draw
    events = [json.loads(line)["event"] for line in (tmp_path / run_folder.LOG_FILE).read_text().splitlines()]
    assert events == ["eval", "eval", "checkpoint", "eval", "eval", "end"]  # no "step" ticks


def test_an_interrupted_run_draws_its_last_evaluations_on_close(tmp_path, monkeypatch):
    drawn: list[int] = []
    monkeypatch.setattr("gptcli.plot.plot_losses", lambda evals, path: drawn.append(len(evals)))
    log = run_folder.RunLog(tmp_path)
    log.record(_eval(0))
    log.record(_eval(10))  # within the interval
    assert drawn == [1]
    log.close()
    assert drawn == [1, 2]


def test_a_run_log_without_plotting_draws_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("gptcli.plot.plot_losses", lambda evals, path: (_ for _ in ()).throw(AssertionError))
    log = run_folder.RunLog(tmp_path, plot=False)
    log.record(_eval(0, final=True))
    log.close()
    assert not (tmp_path / run_folder.PLOT_FILE).exists()
