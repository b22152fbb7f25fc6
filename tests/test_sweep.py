"""Sweep files, packing into programs, the manifest, relaunch and failure handling, nestlearn status."""

import json
import textwrap

import pytest

from nestlearn._errors import ConfigError, NestlearnError, Preempted
from nestlearn.experiment import ExperimentConfig, load_result, override
from nestlearn.experiment._cli import main
from nestlearn.experiment._sweep import Manifest, SweepRun, _preempted, pack, read_sweep, run_sweep

TINY = '''
"""A tiny continual experiment for the sweep tests."""
from nestlearn.experiment import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainSpec

CONFIG = ExperimentConfig(
    data=DataConfig(stream="split_digits", scenario="task", n_tasks=2),
    model=ModelConfig(hidden=(8,)),
    optim=OptimConfig(name="sgd", lr=0.1, momentum=0.0),
    train=TrainSpec(steps_per_task=6, batch_size=16, evals_per_task=1),
    strategies=("ewc",),
    seeds=3,
)
'''

STUDY = '''
"""A study experiment: a dataclass config and run(config, rundir)."""
import dataclasses

@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    width: int = 4

CONFIG = Config()

def run(config, rundir):
    rundir.write_json("results/value.json", {"value": config.seed * config.width})
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.py").write_text(TINY)
    (tmp_path / "experiments" / "study.py").write_text(STUDY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_read_sweep_expands_grid_and_seeds_and_names_bad_keys(tmp_path):
    f = _write(
        tmp_path / "s.toml",
        """
        quick = true
        [[experiment]]
        name = "tiny"
        set = ["data.n_tasks=2"]
        seeds = [3, 4]
        [experiment.grid]
        "sweep.ewc" = [1, 10.5]
        "optim.lr" = [0.1, 0.01]
        [[experiment]]
        name = "study"
        quick = false
        """,
    )
    runs = read_sweep(f)
    assert len(runs) == 2 * 2 * 2 + 1
    assert runs[0] == SweepRun("tiny", ("data.n_tasks=2", "sweep.ewc=1", "optim.lr=0.1"), 3, True)
    assert runs[1].seed == 4 and runs[2].overrides[1:] == ("sweep.ewc=1", "optim.lr=0.01")
    assert runs[4].overrides[1] == "sweep.ewc=10.5"
    assert runs[-1] == SweepRun("study", (), None, False)
    assert len({r.id for r in runs}) == len(runs)
    j = tmp_path / "s.json"
    j.write_text(
        json.dumps({"experiment": [{"name": "tiny", "seeds": 2, "grid": {"strategies": [["naive", "ewc"]]}}]})
    )
    assert [r.overrides for r in read_sweep(j)] == [("strategies=naive,ewc",)] * 2
    bad = {
        "[[experiment]]\nname = 'tiny'\nseeds = 0\n": "experiment 1: seeds must be positive, got 0",
        "[[experiment]]\nname = 'tiny'\n[experiment.grid]\nseeds = [1, 2]\n": "set the seeds with the 'seeds' key",
        "[[experiment]]\nname = 'tiny'\n[experiment.grid]\n'optim.lr' = []\n": "grid 'optim.lr' must be a non-empty",
        "[[experiment]]\nname = 'tiny'\nsets = []\n": "unknown key(s) ['sets']",
        "[[experiment]]\nname = 'tiny'\nset = 'optim.lr=1'\n": "'set' must be a list",
        "[experiment\n": "not valid toml",
        "quik = true\n": "unknown key(s) ['quik']",
    }
    for text, message in bad.items():
        f.write_text(text)
        with pytest.raises(
            ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ):
            read_sweep(f)


def test_pack_merges_seeds_and_swept_strengths_only(workdir):
    runs = [SweepRun("tiny", (f"sweep.ewc={v}",), s, False) for v in (1, 10) for s in (0, 1, 2)]
    runs += [SweepRun("tiny", ("optim.lr=0.01", "sweep.ewc=1"), s, False) for s in (0, 1, 5)]  # 5: a gap
    runs += [SweepRun("tiny", ("optim.lr=oops",), 0, False), SweepRun("study", (), 7, False)]
    errors = []
    groups = pack(runs, on_error=lambda run, msg: errors.append((run.overrides, msg)))
    assert errors == [(("optim.lr=oops",), "config error: optim.lr: expected a number, got 'oops'")]
    assert [(g.overrides, len(g.members)) for g in groups] == [
        (("sweep.ewc=1.0,10.0", "first_seed=0", "seeds=3"), 6),  # 2 strengths x 3 seeds: one program
        (("optim.lr=0.01", "sweep.ewc=1.0", "first_seed=0", "seeds=2"), 2),  # another lr: another program
        (("optim.lr=0.01", "sweep.ewc=1.0", "first_seed=5", "seeds=1"), 1),  # seed 5 is not contiguous
        (("seed=7",), 1),  # a study runs alone, its seed on its seed field
    ]
    assert set(groups[0].members) == {r.id for r in runs[:6]}
    assert groups[0].packed and not groups[3].packed
    # the merged config is exactly the runs' product
    merged = override(ExperimentConfig(), ["strategies=naive,ewc", *groups[0].overrides])
    assert (merged.first_seed, merged.seeds, merged.sweep.ewc) == (0, 3, (1.0, 10.0))
    # --dry-run: the programs, as the nestlearn run commands they amount to; nothing written
    f = _write(
        workdir / "s.toml",
        '[[experiment]]\nname = "tiny"\nseeds = 2\n[experiment.grid]\n"sweep.ewc" = [1, 10]\n',
    )
    logs = []
    run_sweep(f, workdir / "dry", dry_run=True, log=logs.append)
    assert logs[0] == f"sweep {f}: 4 runs, 0 already finished, 4 to run in 1 program(s)"
    assert logs[1].endswith(
        ": 4 run(s): nestlearn run tiny --set sweep.ewc=1.0,10.0 --set first_seed=0 --set seeds=2"
    )
    assert not (workdir / "dry").exists()


def test_sweep_runs_packed_programs_splits_results_and_skips_done_on_relaunch(workdir, capsys):
    # 2 strengths x 2 seeds of one program; lam 1e30 makes the EWC penalty explode in task 2 (diverged)
    f = _write(
        workdir / "s.toml",
        """
        [[experiment]]
        name = "tiny"
        seeds = 2
        [experiment.grid]
        "sweep.ewc" = [1.0, 1e30]
        """,
    )
    out = workdir / "sweep"
    assert main(["sweep", str(f), "--out", str(out)]) == 0
    m = Manifest(out)
    assert m.counts() == {"pending": 0, "running": 0, "done": 2, "diverged": 2, "failed": 0}
    assert len(m.groups) == 1
    runs = {(tuple(r["overrides"]), r["seed"]): r for r in m.runs.values()}
    ewc = load_result(f"{next(iter(m.groups.values()))['directory']}/results/ewc.npz")
    assert ewc.runs == ({"lam": 1.0, "seed": 0}, {"lam": 1.0, "seed": 1}, {"lam": 1e30, "seed": 0},
                        {"lam": 1e30, "seed": 1})  # one program: 2 strengths x 2 seeds  # fmt: skip
    # the split back: each run's row is its own seed and strength, its metric that row's final accuracy
    for (overrides, seed), r in runs.items():
        lam = float(overrides[0].partition("=")[2])
        assert ewc.runs[r["rows"]["ewc"][0]] == {"lam": lam, "seed": seed} and len(r["rows"]["ewc"]) == 1
        row = ewc.select(lam=lam, seed=seed)
        if lam == 1.0:
            assert r["state"] == "done" and r["diverged_step"] == {}
            assert r["metric"]["ewc"] == pytest.approx(float(row.acc_matrix[0, -1].mean()), abs=1e-12)
            assert 0.0 <= r["metric"]["ewc"] <= 1.0
        else:
            assert r["state"] == "diverged" and r["metric"] == {"ewc": None}
            assert r["diverged_step"]["ewc"] == int(row.diverged_step[0]) >= 6  # in task 2 (6 steps per task)
    # nestlearn status: the counts line and one row per run
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "4 runs in 1 programs: 0 pending, 0 running, 2 done, 2 diverged, 0 failed"
    assert len(table) == 2 + 4 and table[1].split()[:3] == ["id", "state", "experiment"]
    for rid, r in m.runs.items():
        (line,) = [row for row in table if row.startswith(rid)]
        shown = (
            f"ewc=diverged@{r['diverged_step']['ewc']}"
            if r["state"] == "diverged"
            else f"ewc={r['metric']['ewc']:.4f}"
        )
        assert line.split()[1] == r["state"] and line.endswith(shown)
    # relaunch: nothing runs again
    calls = []
    run_sweep(f, out, execute=lambda *a: calls.append(a), log=lambda m: None)
    assert calls == [] and Manifest(out).counts()["done"] == 2


def test_failed_group_is_recorded_others_go_on_and_a_relaunch_retries_it(workdir, capsys):
    f = _write(
        workdir / "s.toml",
        """
        [[experiment]]
        name = "study"
        seeds = [1, 2, 3]
        [[experiment]]
        name = "tiny"
        set = ["optim.lr=-1"]
        seeds = 1
        """,
    )
    out = workdir / "sweep"
    done = []

    def execute(group, directory, resume, force):
        if group.overrides == ("seed=2",):
            raise OSError(28, "No space left on device", str(directory))
        done.append(group.overrides)

    m = run_sweep(f, out, execute=execute, log=lambda m: None)
    assert done == [("seed=1",), ("seed=3",)]
    states = {(r["experiment"], r["seed"]): (r["state"], r.get("message")) for r in m.runs.values()}
    assert states[("study", 2)] == (
        "failed", f"operating error: No space left on device: {out}/groups/{m.runs[next(i for i, r in m.runs.items() if r['seed'] == 2)]['group']} (free disk space, or write elsewhere with --out)"
    )  # fmt: skip
    assert states[("tiny", 0)] == ("failed", "config error: optim.lr must be positive, got -1.0")
    assert states[("study", 1)] == ("done", None)
    # a relaunch runs only the failed ones (the config error fails again, as it should)
    done.clear()
    m = run_sweep(f, out, execute=lambda g, d, r, fo: done.append(g.overrides), log=lambda m: None)
    assert done == [("seed=2",)] and m.counts() == {"pending": 0, "running": 0, "done": 3, "diverged": 0,
                                                     "failed": 1}  # fmt: skip
    assert main(["status", str(out), "--state", "failed"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and "optim.lr must be positive" in rows[2]


def test_preempted_group_stops_the_sweep_and_resumes_next_time(workdir, capsys):
    f = _write(workdir / "s.toml", '[[experiment]]\nname = "study"\nseeds = [1, 2]\n')
    out = workdir / "sweep"
    seen = []

    def preempted(group, directory, resume, force):
        seen.append((group.overrides, resume))
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")  # the run had started: a checkpointed directory
        raise SystemExit(4)

    with pytest.raises(SystemExit):
        run_sweep(f, out, execute=preempted, log=lambda m: None)
    assert Manifest(out).counts()["running"] == 1 and Manifest(out).counts()["pending"] == 1
    m = run_sweep(f, out, execute=lambda g, d, r, fo: seen.append((g.overrides, r)), log=lambda m: None)
    assert seen == [(("seed=1",), False), (("seed=1",), True), (("seed=2",), False)]  # resumed, then the next
    assert m.counts()["done"] == 2
    # the run path's preemption, as SystemExit(4) or nestlearn.Preempted, stops the sweep; nothing else does
    assert _preempted(SystemExit(4)) and _preempted(Preempted("sigterm", step=3))
    assert not _preempted(type("PreemptedLookalike", (NestlearnError,), {})("x"))
    assert (
        not _preempted(SystemExit(2))
        and not _preempted(ConfigError("x"))
        and not _preempted(KeyboardInterrupt())
    )
    assert main(["status", str(workdir / "nowhere")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
