"""nestlearn tpu: every gcloud command's exact argv, and the babysitting loop against a fake gcloud."""

import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from nestlearn._errors import ConfigError
from nestlearn.experiment._cli import main
from nestlearn.launch import Job, Launcher, TpuSpec, gcloud
from nestlearn.launch._launcher import install_command

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ZONE = "--zone=us-central2-b"


def test_gcloud_builds_the_documented_commands():
    spec = TpuSpec("exp", "us-central2-b", accelerator_type="v4-32", project="proj", spot=True)
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    tail = [ZONE, "--project=proj"]
    assert gcloud("create", spec) == [*vm, "create", "exp", *tail, "--accelerator-type=v4-32",
                                      "--version=tpu-ubuntu2204-base", "--spot"]  # fmt: skip
    assert gcloud("describe", spec) == [*vm, "describe", "exp", *tail, "--format=value(state)"]
    assert gcloud("delete", spec) == [*vm, "delete", "exp", *tail, "--quiet"]
    assert gcloud("scp", spec, source="/tmp/b.tgz") == [
        *vm,
        "scp",
        "/tmp/b.tgz",
        "exp:~/",
        *tail,
        "--worker=all",
    ]
    assert gcloud("ssh", spec, command="ls") == [*vm, "ssh", "exp", *tail, "--worker=all", "--command=ls"]
    on_demand = TpuSpec("exp", "us-central2-b")
    assert gcloud("create", on_demand) == [*vm, "create", "exp", ZONE, "--accelerator-type=v4-8",
                                           "--version=tpu-ubuntu2204-base"]  # fmt: skip
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    queued = TpuSpec("exp", "us-central2-b", version="v2-alpha-tpuv5-lite", queued=True, spot=True)
    assert gcloud("create", queued) == [*qr, "create", "exp", "--node-id=exp", ZONE, "--accelerator-type=v4-8",
                                        "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]  # fmt: skip
    assert gcloud("describe", queued) == [*qr, "describe", "exp", ZONE, "--format=value(state.state)"]
    assert gcloud("delete", queued) == [*qr, "delete", "exp", ZONE, "--force", "--quiet"]
    best = TpuSpec("exp", "us-central2-b", best_effort=True)
    assert gcloud("create", best)[:5] == ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
    assert gcloud("create", best)[-1] == "--best-effort"
    with pytest.raises(ConfigError, match="--name 'Exp_1'"):
        TpuSpec("Exp_1", "us-central2-b")
    with pytest.raises(ConfigError, match="give one"):
        TpuSpec("exp", "us-central2-b", spot=True, best_effort=True)


def test_job_command_keeps_the_exit_code_and_resumes():
    job = Job(out="gs://b/run", experiment="permuted_mnist_forgetting", sets=("optim.lr=0.1",), quick=True)
    cmd = job.command(resume=True)
    assert cmd.endswith(
        "nestlearn run permuted_mnist_forgetting --out gs://b/run --set optim.lr=0.1 --quick --resume-if-started & "
        'echo $! > job.pid; wait $!; rc=$?; echo "nestlearn-exit $rc"; exit $rc'
    )
    assert 'kill -TERM "$(cat job.pid)"' in cmd  # a run left from a dropped connection is stopped first
    assert "--resume" not in job.command(resume=False)
    sweep = Job(out="gs://b/s", sweep="/local/dir/grid.toml").command(resume=True)
    assert "nestlearn sweep grid.toml --out gs://b/s &" in sweep  # a sweep resumes by itself
    with pytest.raises(ConfigError, match="one of them"):
        Job(out="gs://b", experiment="a", sweep="b.toml")


def test_job_command_runs_in_a_shell_stops_a_leftover_run_and_reports_the_exit_code(tmp_path):
    # the remote command, run by a real shell: HOME with the unpacked bundle, a fake nestlearn that exits 4
    (tmp_path / "nestlearn").mkdir()
    bin_dir = tmp_path / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nestlearn").write_text('#!/bin/sh\necho "args: $*"\nexit 4\n')
    (bin_dir / "nestlearn").chmod(0o755)
    leftover = subprocess.Popen(["sleep", "60"])  # a run still going after its ssh connection dropped
    reaper = threading.Thread(target=leftover.wait)  # reaped when it ends, as init reaps an orphan
    reaper.start()
    (tmp_path / "nestlearn" / "job.pid").write_text(str(leftover.pid))
    command = Job(out="gs://b/r", experiment="x").command(resume=True)
    try:
        proc = subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(tmp_path)},
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    finally:
        if leftover.poll() is None:
            leftover.kill()
        reaper.join()
    assert leftover.returncode == -15  # stopped with SIGTERM before the new run started
    assert proc.stdout.splitlines() == ["args: run x --out gs://b/r --resume-if-started", "nestlearn-exit 4"]
    assert proc.returncode == 4
    assert (tmp_path / "nestlearn" / "job.pid").read_text().strip() != str(leftover.pid)


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """``gcloud`` on PATH is tests/fake_gcloud.py; returns (set_world, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_gcloud.py"}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log, state = tmp_path / "calls.jsonl", tmp_path / "world.json"
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))

    def set_world(**world):
        state.write_text(json.dumps({"vm": "absent", **world}))

    def calls():
        return (
            [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()] if log.exists() else []
        )

    return set_world, calls


def _launcher(tmp_path, spec, job, **kw):
    wheel = tmp_path / "nestlearn-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not a real wheel")
    logs, lines = [], []
    launcher = Launcher(spec, job, wheel=str(wheel), stage=tmp_path / "stage", repo=REPO, log=logs.append,
                        emit=lines.append, sleep=lambda s: None, **kw)  # fmt: skip
    return launcher, logs, lines


SPEC = TpuSpec("nl-test", "us-central2-b", spot=True)
JOB = Job(out="gs://bucket/run", experiment="permuted_mnist_forgetting")


def _expected(spec, tmp_path, steps):
    """The gcloud argv sequence for steps like ("describe",), ("setup",), ("run", resume)."""
    archive = str(tmp_path / "stage" / "nestlearn-bundle.tar.gz")
    out = []
    for step in steps:
        if step[0] == "setup":
            out += [gcloud("scp", spec, source=archive),
                    gcloud("ssh", spec, command=install_command("nestlearn-0.1.0-py3-none-any.whl"))]  # fmt: skip
        elif step[0] == "run":
            out.append(gcloud("ssh", spec, command=JOB.command(resume=step[1])))
        else:
            out.append(gcloud(step[0], spec))
    return out


def test_preempted_vm_is_recreated_and_the_run_resumed(fake_gcloud, tmp_path):
    set_world, calls = fake_gcloud
    set_world(runs=["preempt", "ok"])
    launcher, logs, lines = _launcher(tmp_path, SPEC, JOB)
    assert launcher.launch() == 0
    assert calls() == _expected(SPEC, tmp_path, [
        ("describe",), ("create",), ("setup",), ("run", False),  # first launch: preempted mid-run
        ("describe",), ("delete",), ("create",), ("setup",), ("run", True),  # recreated, --resume
        ("delete",),
    ])  # fmt: skip
    assert calls()[10][-1].startswith("--command=export PATH")
    assert "--resume-if-started &" in calls()[10][-1] and "--resume" not in calls()[4][-1]
    assert lines == ["worker 0: [naive] task 1/3 done", "worker 0: [naive] task 1/1 done",
                     "worker 1: [naive] task 1/1 done"]  # fmt: skip
    assert any("nl-test is PREEMPTED" in m for m in logs)
    assert json.loads((tmp_path / "world.json").read_text())["vm"] == "absent"  # deleted at the end


def test_exit_4_on_a_healthy_vm_relaunches_without_recreating(fake_gcloud, tmp_path):
    set_world, calls = fake_gcloud
    set_world(runs=["exit4", "ok"])
    launcher, logs, _ = _launcher(tmp_path, SPEC, JOB, keep=True)
    assert launcher.launch() == 0
    assert calls() == _expected(SPEC, tmp_path, [
        ("describe",), ("create",), ("setup",), ("run", False), ("describe",), ("run", True),
    ])  # fmt: skip
    assert any("kept nl-test" in m for m in logs)  # --keep: no delete


def test_config_error_is_not_retried_and_give_up_after_max_attempts(fake_gcloud, tmp_path):
    set_world, calls = fake_gcloud
    set_world(runs=["config"])
    launcher, logs, _ = _launcher(tmp_path, SPEC, JOB)
    assert launcher.launch() == 2
    assert calls() == _expected(SPEC, tmp_path, [
        ("describe",), ("create",), ("setup",), ("run", False), ("delete",),
    ])  # fmt: skip
    (tmp_path / "calls.jsonl").unlink()
    set_world(runs=["preempt", "preempt"])
    launcher, logs, _ = _launcher(tmp_path, SPEC, JOB, max_attempts=2)
    assert launcher.launch() == 5
    assert calls() == _expected(SPEC, tmp_path, [
        ("describe",), ("create",), ("setup",), ("run", False),
        ("describe",), ("delete",), ("create",), ("setup",), ("run", True),
        ("describe",), ("delete",),
    ])  # fmt: skip
    assert any("giving up after 2 launches" in m for m in logs)


def test_queued_resource_waits_for_active_and_reuses_a_ready_vm(fake_gcloud, tmp_path):
    set_world, calls = fake_gcloud
    spec = TpuSpec("nl-q", "us-central2-b", queued=True, spot=True)
    set_world(queue=["WAITING_FOR_RESOURCES", "PROVISIONING"], runs=["ok"])
    launcher, logs, _ = _launcher(tmp_path, spec, JOB)
    assert launcher.launch() == 0
    assert calls() == _expected(spec, tmp_path, [
        ("describe",), ("create",), ("describe",), ("describe",), ("describe",), ("setup",), ("run", False),
        ("delete",),
    ])  # fmt: skip
    assert calls()[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    (tmp_path / "calls.jsonl").unlink()
    set_world(vm="READY", runs=["ok"])  # a VM of that name already up: reused, not recreated
    launcher, logs, _ = _launcher(tmp_path, SPEC, JOB)
    assert launcher.launch() == 0
    assert calls() == _expected(SPEC, tmp_path, [("describe",), ("setup",), ("run", False), ("delete",)])


def test_cli_dry_run_prints_commands_and_refuses_bad_input(fake_gcloud, tmp_path, capsys):
    set_world, calls = fake_gcloud
    set_world(runs=[])
    wheel = tmp_path / "nestlearn-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"x")
    args = ["tpu", "permuted_mnist_forgetting", "--name", "nl-dry", "--zone", "us-central2-b", "--out",
            "gs://b/r", "--spot", "--wheel", str(wheel), "--dry-run"]  # fmt: skip
    assert main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ gcloud")]
    assert [line.split()[5] for line in printed] == ["create", "scp", "ssh", "ssh", "delete"]
    assert printed[1].split()[7] == "'nl-dry:~/'" and "nl-dry --zone=us-central2-b" in printed[4]
    assert "--spot" in printed[0] and calls() == []  # nothing ran
    assert main([*args[:7], "/tmp/local", *args[8:]]) == 2
    assert "--out /tmp/local: results on the VM's disk are lost" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[[experiment]]\nnme = 'x'\n")
    assert main(["tpu", "--sweep", str(bad), *args[2:]]) == 2
    assert f"sweep file {bad}, experiment 1: unknown key(s) ['nme']" in capsys.readouterr().err


def test_no_gcloud_on_path_is_one_operating_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud here
    launcher, logs, _ = _launcher(tmp_path, SPEC, JOB)
    assert launcher.launch() == 3
    assert (
        logs[-1]
        == "operating error: gcloud not found on PATH: install the Google Cloud SDK (cloud.google.com/sdk)"
    )


def test_bundle_holds_wheel_experiments_and_sweep_file(tmp_path):
    sweep = tmp_path / "grid.toml"
    sweep.write_text("[[experiment]]\nname = 'permuted_mnist_forgetting'\n")
    launcher, _, _ = _launcher(tmp_path, SPEC, Job(out="gs://b/s", sweep=str(sweep)))
    from nestlearn.launch import build_bundle

    mine = tmp_path / "my_experiment.py"
    mine.write_text("CONFIG = None\n")
    archive, wheel = build_bundle(tmp_path / "stage", wheel=launcher.wheel, sweep=str(sweep),
                                  runner=launcher.runner, repo=REPO, extra=[str(mine)])  # fmt: skip
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert wheel == "nestlearn-0.1.0-py3-none-any.whl"
    assert {wheel, "grid.toml", "my_experiment.py", "experiments/permuted_mnist_forgetting.py"} <= names
    # an experiment given as a file runs under its name at the top of the unpacked bundle
    assert " run my_experiment.py --out gs://b/r " in Job(out="gs://b/r", experiment=str(mine)).command(
        resume=False
    )
    assert not any("__pycache__" in n for n in names)
