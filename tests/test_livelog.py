"""Live logs: JSON lines flushed per chunk, a reader that tolerates a line being written, the callbacks of
the run loops, TensorBoard event files (when tensorboardX is installed) and the live figure."""

import json
import struct
import subprocess
import sys

import numpy as np
import optax
import pytest

from nestlearn import continual, nn, plot
from nestlearn._errors import ConfigError, DataError
from nestlearn.experiment import LiveLog, _livelog, both, read_live, tail_live


def test_lines_are_flushed_and_readable_by_another_process_while_open(tmp_path):
    live = LiveLog(tmp_path, runs=[{"seed": 0, "lam": 10.0}, {"seed": 1, "lam": 10.0}], tensorboard=False)
    live.section("ewc")
    live.chunk(step=50, loss=np.float32([0.5, np.nan]), acc=[0.75, 0.5], diverged=[False, True], task=0)
    # Another process reads the file while the writer still holds it open.
    code = "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])]))"
    seen = json.loads(
        subprocess.run(
            [sys.executable, "-c", code, str(live.path)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert len(seen) == 1
    line = seen[0]
    assert line["kind"] == "chunk" and line["section"] == "ewc" and line["step"] == 50 and line["task"] == 0
    assert line["runs"] == ["seed=0,lam=10.0", "seed=1,lam=10.0"]
    assert line["loss"] == [0.5, None]  # NaN written as null: strict JSON
    assert line["acc"] == [0.75, 0.5] and line["diverged"] == [False, True]
    assert line["wall"] >= 0 and line["time"] > 1.6e9
    live.close()
    records = read_live(live.path, arrays=True)
    assert [r["kind"] for r in records] == ["chunk", "end"]
    np.testing.assert_array_equal(records[0]["loss"], [0.5, np.nan])  # null read back as NaN
    assert json.loads(live.path.read_text().splitlines()[0])["acc"] == [0.75, 0.5]


def test_float32_values_are_written_as_their_shortest_decimal(tmp_path):
    with LiveLog(tmp_path, runs=[0], tensorboard=False) as live:
        live.chunk(step=1, loss=np.float32([0.1]))
    assert '"loss":[0.1]' in live.path.read_text()


def test_reader_leaves_a_partial_last_line_for_the_next_call(tmp_path):
    path = tmp_path / "live.jsonl"
    whole = json.dumps({"kind": "chunk", "step": 1, "loss": [1.0]}) + "\n"
    path.write_text(whole + '{"kind": "chunk", "st')
    records, offset = tail_live(path)
    assert [r["step"] for r in records] == [1]
    assert offset == len(whole.encode())
    with open(path, "a") as f:  # the writer finishes its line and writes another
        f.write('ep": 2, "loss": [0.5]}\n' + json.dumps({"kind": "chunk", "step": 3, "loss": [0.25]}) + "\n")
    more, offset2 = tail_live(path, offset)
    assert [r["step"] for r in more] == [2, 3] and offset2 == path.stat().st_size
    assert tail_live(path, offset2) == ([], offset2)


def test_resume_after_a_kill_ends_the_cut_line_and_the_reader_skips_it(tmp_path):
    path = tmp_path / "live.jsonl"
    path.write_text(json.dumps({"kind": "chunk", "step": 1, "loss": [1.0]}) + '\n{"kind": "chu')  # killed
    with LiveLog(tmp_path, runs=[0], tensorboard=False) as live:
        live.chunk(step=2, loss=[0.5])
    with pytest.warns(UserWarning, match=r"live.jsonl: skipped a damaged line at byte \d+"):
        records = read_live(path)
    assert [(r["kind"], r.get("step")) for r in records] == [("chunk", 1), ("chunk", 2), ("end", None)]


def test_missing_log_and_missing_tensorboard_get_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no live log at .*nothing.jsonl"):
        read_live(tmp_path / "nothing.jsonl")
    monkeypatch.setattr(_livelog, "_tensorboard_writer", lambda logdir: None)
    with pytest.raises(ConfigError, match="tensorboard=True needs tensorboardX"):
        LiveLog(tmp_path, tensorboard=True)
    with LiveLog(tmp_path, tensorboard=None) as live:  # optional: silently JSON only
        assert live.tb is None
    with pytest.raises(ValueError, match=r"evaluation acc must be \[runs, tasks\]"):
        LiveLog(tmp_path, tensorboard=False).evaluation(step=1, acc=[0.5, 0.5])


def test_callbacks_log_every_chunk_of_a_continual_task(tmp_path, tiny_stream):
    stream = tiny_stream(n_tasks=2)
    config = continual.TrainConfig(steps_per_task=12, batch_size=8, eval_every=5)  # chunks end at 5, 10, 12
    learner = continual.Learner(
        lambda rngs: nn.MLP(6, (8,), 3, rngs=rngs), optax.sgd(0.1), continual.Naive(), config
    )
    state = learner.init(stream, [0, 1])
    calls = []
    with LiveLog(tmp_path, runs=[0, 1], tensorboard=False) as live:
        live.section("naive")
        live.evaluation(step=0, acc=learner.evaluate(state, stream), task=-1)
        for task in range(2):
            on_chunk = both(
                live.task_chunks(task, config.steps_per_task), lambda *a: calls.append(a[0]), None
            )
            state, out = learner.run_task(state, stream, task, on_chunk=on_chunk)
            live.evaluation(step=(task + 1) * config.steps_per_task, acc=out.acc_row, task=task)
            chunk_lines = [
                r for r in read_live(live.path, arrays=True) if r["kind"] == "chunk" and r["task"] == task
            ]
            assert [r["step"] for r in chunk_lines] == [task * 12 + s for s in (5, 10, 12)]
            np.testing.assert_allclose(np.stack([r["loss"] for r in chunk_lines], 1), out.loss, rtol=1e-6)
            np.testing.assert_allclose(np.stack([r["acc"] for r in chunk_lines], 1), out.train_acc, rtol=1e-6)
    assert calls == [5, 10, 12, 5, 10, 12]  # `both` called the other callback too
    series = plot.live_series(tmp_path)
    assert series["section"] == "naive" and series["loss"].shape == (2, 6)
    np.testing.assert_allclose(series["eval_acc"][:, -1], np.asarray(out.acc_row), rtol=1e-6)


def test_engine_log_maps_run_chunks_info(tmp_path):
    with LiveLog(tmp_path, runs=["a", "b"], tensorboard=False) as live:
        log = live.engine_log("maml")
        # What nestlearn.engine.run_chunks hands its `log` after chunk 3 of 10 steps.
        log({"chunk": 3, "step": 40, "loss": np.array([0.5, 0.25]), "diverged": np.array([False, False])})
    (line,) = [r for r in read_live(live.path) if r["kind"] == "chunk"]
    assert (line["section"], line["chunk"], line["step"], line["loss"], line["diverged"]) == (
        "maml",
        3,
        40,
        [0.5, 0.25],
        [False, False],
    )
    assert "acc" not in line


def _events(logdir):
    """(tag, step, value) of every scalar in the TFRecord event files under ``logdir``."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # record: uint64 length, uint32 crc, payload, uint32 crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            pos += 12 + n + 4
    return out


def test_tensorboard_event_files_hold_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    with LiveLog(tmp_path, runs=["s0", "s1"], tensorboard=True) as live:
        live.section("ewc")
        live.chunk(step=100, loss=[0.5, 1.5], acc=[0.25, np.nan])
        live.evaluation(step=100, acc=[[0.9, 0.1], [0.7, 0.3]], task=0)
    events = {(tag, step): value for tag, step, value in _events(tmp_path / "tb")}
    assert events[("ewc/loss/mean", 100)] == pytest.approx(1.0)
    assert events[("ewc/loss/s1", 100)] == pytest.approx(1.5)
    assert events[("ewc/acc/mean", 100)] == pytest.approx(0.25)  # the NaN run left out of the mean
    assert ("ewc/acc/s1", 100) not in events
    assert events[("ewc/eval_acc/task0/mean", 100)] == pytest.approx(0.8)
    assert events[("ewc/eval_acc/task1/s0", 100)] == pytest.approx(0.1)


def recorded_log(path):
    """A recorded two-task log of three runs, the third diverged in task 1."""
    with LiveLog(path, runs=[0, 1, 2], tensorboard=False) as live:
        live.section("si")
        live.evaluation(step=0, acc=[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], task=-1)
        live.chunk(step=5, loss=[1.0, 2.0, 3.0], diverged=[False, False, False])
        live.chunk(step=10, loss=[0.5, 1.0, 1.5], diverged=[False, False, False])
        live.evaluation(step=10, acc=[[0.9, 0.5], [0.7, 0.5], [0.8, 0.5]], task=0)
        live.chunk(step=15, loss=[0.4, 0.8, np.nan], diverged=[False, False, True])
        live.evaluation(step=20, acc=[[0.6, 0.95], [0.4, 0.85], [np.nan, np.nan]], task=1)
    return live.path


def test_live_curves_draws_a_recorded_log(tmp_path):
    fig = plot.live_curves(recorded_log(tmp_path), task_names=["A", "B"])
    ax_loss, ax_acc = fig.axes[:2]
    loss = ax_loss.lines[0]
    np.testing.assert_array_equal(loss.get_xdata(), [5, 10, 15])
    np.testing.assert_allclose(loss.get_ydata(), [1.5, 0.75, 0.6])  # runs 0 and 1 only (2 diverged)
    a, b = ax_acc.lines
    assert (a.get_label(), b.get_label()) == ("A", "B")
    # Task A from step 0: 0.5, mean(0.9, 0.7), mean(0.6, 0.4); task B from the end of task A on.
    np.testing.assert_array_equal(a.get_xdata(), [0, 10, 20])
    np.testing.assert_allclose(a.get_ydata(), [0.5, 0.8, 0.5])
    np.testing.assert_array_equal(b.get_xdata(), [10, 20])
    np.testing.assert_allclose(b.get_ydata(), [0.5, 0.9])
    assert fig._suptitle.get_text() == "si · 1 of 3 runs diverged (excluded)"
    # Redrawing into the same figure replaces the panels (what the notebook watcher does).
    again = plot.live_curves(recorded_log(tmp_path / "again"), fig=fig)
    assert again is fig and len(fig.axes) == 2


def test_watch_live_stops_at_the_end_line(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    shown = []

    class Handle:
        def update(self, fig):
            shown.append([line.get_ydata().copy() for line in fig.axes[0].lines])

    monkeypatch.setattr("IPython.display.display", lambda fig, display_id: Handle())
    plot.watch_live(recorded_log(tmp_path), every=0.01, timeout=5.0)
    assert len(shown) == 1  # the log ends with its "end" line: one draw, no waiting
    np.testing.assert_allclose(shown[0][0], [1.5, 0.75, 0.6])
