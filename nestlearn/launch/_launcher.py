"""``nestlearn tpu``: create a TPU VM, copy and install the code, run, babysit through preemptions, delete.

The loop a researcher runs by hand on spot or queued capacity, written once:

1. create the TPU VM (on-demand, ``--spot``, or a queued resource, waiting until it is ACTIVE), or reuse
   one of that name that is READY;
2. build a wheel of this nestlearn, pack it with ``experiments/`` (and the sweep file) into one archive,
   ``scp`` it to every worker and ``pip install 'nestlearn-*.whl[tpu]'`` there;
3. run the experiment (or sweep) with the same command on ``--worker=all``, streaming its log; the remote
   command ends by printing ``nestlearn-exit <code>`` so the run's exit code survives ssh;
4. exit 0: done. Exit 2 (a config error): stop, nothing is retried. Exit 4 (preempted, checkpoint
   written) or a lost connection: describe the VM; if it is PREEMPTED/TERMINATED (or gone), delete and
   recreate it and reinstall; relaunch with ``--resume``. At most ``max_attempts`` launches;
5. delete the VM (unless ``keep``).

Every gcloud command comes from :func:`nestlearn.launch.gcloud`; with ``dry_run`` they are printed
(with the local build steps) and nothing runs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nestlearn._errors import ConfigError, NestlearnError
from nestlearn.launch._gcloud import QUEUED_READY, READY, TRANSIENT, TpuSpec, gcloud

EXIT_DONE, EXIT_CONFIG, EXIT_OPERATING, EXIT_PREEMPTED = 0, 2, 3, 4
EXIT_GAVE_UP = 5  # the launcher's own: every attempt was preempted or lost
MARKER = re.compile(r"nestlearn-exit (\d+)")
BUNDLE = "nestlearn-bundle.tar.gz"
REMOTE_DIR = "$HOME/nestlearn"


@dataclasses.dataclass(frozen=True)
class Job:
    """What runs on the TPU: one experiment (``nestlearn run``) or a sweep file (``nestlearn sweep``).

    ``out`` should be a ``gs://`` path: every host writes there, and it outlives the VM.
    """

    out: str
    experiment: str = ""
    sweep: str = ""
    sets: tuple[str, ...] = ()
    quick: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if bool(self.experiment) == bool(self.sweep):
            raise ConfigError("nestlearn tpu: give an EXPERIMENT or --sweep FILE (one of them)")
        if self.sweep and (self.sets or self.quick):
            raise ConfigError(
                "--set and --quick belong in the sweep file (per experiment), not on the command"
            )

    def command(self, *, resume: bool) -> str:
        """The shell command every worker runs (in the unpacked bundle), ending with the exit marker."""
        cli = ["nestlearn"]
        if self.sweep:
            argv = [*cli, "sweep", Path(self.sweep).name, "--out", self.out]
        else:
            # an experiment given as a file is shipped at the bundle's top level (see build_bundle)
            name = Path(self.experiment).name if self.experiment.endswith(".py") else self.experiment
            argv = [*cli, "run", name, "--out", self.out]
            argv += [a for s in self.sets for a in ("--set", s)]
            # A relaunch continues the run if the first launch got as far as starting it (a preemption
            # can come before the run directory exists); --resume given by the user insists on one.
            again = ["--resume"] if self.resume else ["--resume-if-started"] if resume else []
            argv += ["--quick"] * self.quick + again
        # A run left over from a dropped connection is stopped first (SIGTERM: it checkpoints and exits),
        # so two processes never write one run directory; the run's pid is kept in job.pid for that.
        stop_old = (
            'if [ -f job.pid ] && kill -0 "$(cat job.pid)" 2>/dev/null; then kill -TERM "$(cat job.pid)"; '
            'while kill -0 "$(cat job.pid)" 2>/dev/null; do sleep 1; done; fi'
        )
        return (
            f'export PATH="$HOME/.local/bin:$PATH"; cd "{REMOTE_DIR}" || exit 3; {stop_old}; '
            f'{shlex.join(argv)} & echo $! > job.pid; wait $!; rc=$?; echo "nestlearn-exit $rc"; exit $rc'
        )


def install_command(wheel: str) -> str:
    """Unpacks the bundle and installs the wheel with the ``tpu`` extra (``jax[tpu]``) on a worker."""
    return (
        f'set -e; mkdir -p "{REMOTE_DIR}" && tar -xzf "$HOME/{BUNDLE}" -C "{REMOTE_DIR}" && '
        f'python3 -m pip install -q "{REMOTE_DIR}/{wheel}[tpu]"'
    )


def _missing(argv: Sequence[str]) -> OSError:
    hint = ": install the Google Cloud SDK (cloud.google.com/sdk)" if argv[0] == "gcloud" else ""
    return OSError(f"{argv[0]} not found on PATH{hint}")


class Runner:
    """Runs commands; :class:`DryRun` prints them instead. Subclass to run elsewhere."""

    def call(self, argv: Sequence[str], *, quiet: bool = False) -> tuple[int, str]:
        """Runs ``argv``, returns its exit code and its stdout (stderr passes through unless ``quiet``)."""
        try:
            proc = subprocess.run(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True
            )
        except FileNotFoundError:
            raise _missing(argv) from None
        return proc.returncode, proc.stdout

    def stream(self, argv: Sequence[str], emit: Callable[[str], None]) -> int:
        """Runs ``argv``, passing each line of its output (stdout and stderr) to ``emit`` as it comes."""
        try:
            proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except FileNotFoundError:
            raise _missing(argv) from None
        assert proc.stdout is not None
        for line in proc.stdout:
            emit(line.rstrip("\n"))
        return proc.wait()


class DryRun(Runner):
    """Prints every command (``$ ...``) and runs none; every command "succeeds"."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out

    def call(self, argv: Sequence[str], *, quiet: bool = False) -> tuple[int, str]:
        self.out(f"$ {shlex.join(argv)}")
        return 0, ""

    def stream(self, argv: Sequence[str], emit: Callable[[str], None]) -> int:
        self.out(f"$ {shlex.join(argv)}")
        emit("nestlearn-exit 0")
        return 0


def build_bundle(
    stage: Path, *, wheel: str | None, sweep: str, runner: Runner, repo: Path, extra: Sequence[str] = ()
) -> tuple[Path, str]:
    """Builds the archive copied to every worker: the wheel, ``experiments/`` and the sweep file.

    Args:
      stage: a local folder for the build.
      wheel: a wheel to ship; ``None`` builds one from ``repo`` with ``pip wheel --no-deps`` (which
        fetches the build backend, setuptools, as ``pip install`` does).
      sweep: the sweep file ("" for none), shipped at the archive's top level.
      extra: more files shipped at the top level (an experiment given as a path).
      runner: runs the build (a :class:`DryRun` prints it).
      repo: the nestlearn source tree (``pyproject.toml``, ``experiments/``).

    Returns:
      The archive's path and the wheel's file name.
    """
    stage.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        # built from a copy of the package's files, so the checkout gets no build/ or egg-info litter
        src = stage / "src"
        if not isinstance(runner, DryRun):
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(
                repo / "nestlearn", src / "nestlearn", ignore=shutil.ignore_patterns("__pycache__")
            )
            for name in ("pyproject.toml", "README.md"):
                shutil.copy2(repo / name, src / name)
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(stage), str(src)]
        rc, _ = runner.call(argv)
        if rc != 0:
            raise NestlearnError(f"building the nestlearn wheel failed (exit {rc}): {shlex.join(argv)}")
        wheels = sorted(stage.glob("nestlearn-*.whl"))
        if isinstance(runner, DryRun):
            from nestlearn.experiment._rundir import versions

            wheels = wheels or [stage / f"nestlearn-{versions()['nestlearn']}-py3-none-any.whl"]
        if not wheels:
            raise NestlearnError(f"pip wheel wrote no nestlearn-*.whl into {stage}")
        wheel_path = wheels[-1]
    else:
        wheel_path = Path(wheel)
        if not wheel_path.is_file() or not wheel_path.name.endswith(".whl"):
            raise ConfigError(f"--wheel {wheel}: not a .whl file")
    archive = stage / BUNDLE
    if isinstance(runner, DryRun):
        runner.out(f"# pack {wheel_path.name}, experiments/{' and ' + sweep if sweep else ''} into {archive}")
        return archive, wheel_path.name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(wheel_path, arcname=wheel_path.name)
        experiments = repo / "experiments"
        if experiments.is_dir():
            tar.add(experiments, arcname="experiments", filter=_no_cache)
        for file in [sweep, *extra] if sweep else extra:
            tar.add(file, arcname=Path(file).name)
    return archive, wheel_path.name


def _no_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


class Launcher:
    """Creates, sets up, runs and babysits one TPU VM for one :class:`Job`.

    Args:
      spec: the TPU.
      job: what runs on it.
      runner: runs the commands (``DryRun()`` prints them).
      max_attempts: launches of the job before giving up (a preempted or lost run is relaunched).
      keep: leave the VM running at the end.
      wheel: a prebuilt wheel to ship (default: build one from this source tree).
      poll: seconds between state checks while a queued resource waits for capacity.
      queue_timeout: seconds to wait for a queued resource to become ACTIVE.
      log: where the launcher's own lines go (the run's log is streamed to ``emit``).
      emit: where the remote log lines go (default: stdout).
      sleep: the wait between polls (a test passes a no-op).
    """

    def __init__(
        self,
        spec: TpuSpec,
        job: Job,
        *,
        runner: Runner | None = None,
        max_attempts: int = 5,
        keep: bool = False,
        wheel: str | None = None,
        poll: float = 30.0,
        queue_timeout: float = 24 * 3600.0,
        stage: Path | None = None,
        repo: Path | None = None,
        log: Callable[[str], None] | None = None,
        emit: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError(f"--max-attempts must be at least 1, got {max_attempts}")
        if not job.out.startswith("gs://") and not keep:
            raise ConfigError(
                f"--out {job.out}: results on the VM's disk are lost when it is deleted; give a gs:// path "
                "(every host writes there) or pass --keep"
            )
        self.spec, self.job, self.runner = spec, job, runner or Runner()
        self.dry = isinstance(self.runner, DryRun)
        self.max_attempts, self.keep, self.wheel = max_attempts, keep, wheel
        self.poll, self.queue_timeout, self.sleep = poll, queue_timeout, sleep
        self.stage = stage
        self.repo = repo or Path(__file__).resolve().parents[2]
        self.log = log or (lambda m: print(f"[nestlearn tpu] {m}", file=sys.stderr, flush=True))
        self.emit = emit or (lambda line: print(line, flush=True))
        self.attempts = 0

    # -- the pieces -----------------------------------------------------------------------------------
    def _gcloud(self, action: str, **kw: str) -> tuple[int, str]:
        # describe is a probe: "not found" on stderr is an answer, not an error to show
        return self.runner.call(gcloud(action, self.spec, **kw), quiet=action == "describe")

    def state(self) -> str:
        """The VM's state (READY, PREEMPTED, ...; ACTIVE is READY for a queued resource), or "" if absent."""
        rc, out = self._gcloud("describe")
        if rc != 0:
            return ""
        state = out.strip().splitlines()[-1].strip() if out.strip() else ""
        return READY if state == QUEUED_READY else state

    def create(self) -> None:
        """Creates the VM; a queued resource is polled until ACTIVE (FAILED or the timeout is an error)."""
        kind = "queued resource" if self.spec.queued or self.spec.best_effort else "TPU VM"
        self.log(f"creating {kind} {self.spec.name} ({self.spec.accelerator_type}"
                 f"{', spot' if self.spec.spot else ''}) in {self.spec.zone}")  # fmt: skip
        rc, _ = self._gcloud("create")
        if rc != 0:
            raise OSError(f"gcloud could not create {self.spec.name} (exit {rc}); see its message above")
        if self.dry or not (self.spec.queued or self.spec.best_effort):
            return
        waited = 0.0
        while (state := self.state()) != READY:
            if state in ("FAILED", "SUSPENDED"):
                raise OSError(f"queued resource {self.spec.name} is {state}; see gcloud compute tpus "
                              f"queued-resources describe {self.spec.name} --zone={self.spec.zone}")  # fmt: skip
            if waited >= self.queue_timeout:
                raise OSError(f"queued resource {self.spec.name} not ACTIVE after {waited:.0f}s (last state "
                              f"{state or 'unknown'}); it stays queued: delete it or rerun with --keep")  # fmt: skip
            self.sleep(self.poll)
            waited += self.poll
        self.log(f"{self.spec.name} is ACTIVE after {waited:.0f}s in the queue")

    def delete(self) -> None:
        self.log(f"deleting {self.spec.name}")
        rc, _ = self._gcloud("delete")
        if rc != 0:
            self.log(f"WARNING: deleting {self.spec.name} failed (exit {rc}); delete it by hand: "
                     + shlex.join(gcloud("delete", self.spec)))  # fmt: skip

    def setup(self, archive: Path, wheel: str) -> None:
        """Copies the bundle to every worker and installs it."""
        self.log(f"copying {archive.name} to every worker of {self.spec.name} and installing {wheel}[tpu]")
        rc, _ = self._gcloud("scp", source=str(archive))
        if rc != 0:
            raise OSError(f"gcloud scp to {self.spec.name} failed (exit {rc})")
        rc, _ = self._gcloud("ssh", command=install_command(wheel))
        if rc != 0:
            raise OSError(
                f"installing nestlearn on {self.spec.name} failed (exit {rc}); see the output above"
            )

    def run_job(self, *, resume: bool) -> int | None:
        """Launches the job on every worker, streaming its log; the run's exit code (the worst a worker
        reported: 2 before 4 before any other nonzero), or ``None`` if no worker reported one."""
        codes: list[int] = []

        def emit(line: str) -> None:
            match = MARKER.search(line)
            if match:
                codes.append(int(match.group(1)))
            else:
                self.emit(line)

        rc = self.runner.stream(gcloud("ssh", self.spec, command=self.job.command(resume=resume)), emit)
        if not codes:
            self.log(f"the connection ended (ssh exit {rc}) before the run reported an exit code")
            return None
        for code in (EXIT_CONFIG, EXIT_PREEMPTED):
            if code in codes:
                return code
        return max(codes) if any(codes) else (0 if rc == 0 else rc)

    # -- the loop -------------------------------------------------------------------------------------
    def launch(self) -> int:
        """Runs the whole loop; returns 0 (done), 2 (config error), 3 (gcloud failed) or 5 (gave up).

        Any other exit code of the run (a crash) is returned as it is, after deleting the VM.
        """
        with tempfile.TemporaryDirectory(prefix="nestlearn-tpu-") as tmp:
            stage = self.stage or Path(tmp)
            experiment = self.job.experiment
            extra = [experiment] if experiment.endswith(".py") and Path(experiment).is_file() else []
            archive, wheel = build_bundle(stage, wheel=self.wheel, sweep=self.job.sweep, runner=self.runner,
                                          repo=self.repo, extra=extra)  # fmt: skip
            created = False
            try:
                state = "" if self.dry else self.state()
                if state == READY:
                    self.log(f"reusing {self.spec.name} (READY)")
                else:
                    if state:
                        self.log(f"{self.spec.name} exists but is {state}; recreating it")
                        self.delete()
                    self.create()
                created = True
                self.setup(archive, wheel)
                resume = False
                while True:
                    self.attempts += 1
                    self.log(f"launch {self.attempts}/{self.max_attempts}{' (--resume)' if resume else ''}: "
                             f"{self.job.command(resume=resume)}")  # fmt: skip
                    code = self.run_job(resume=resume)
                    if code == EXIT_DONE:
                        self.log(f"done after {self.attempts} launch(es); results in {self.job.out}")
                        return EXIT_DONE
                    if code == EXIT_CONFIG:
                        self.log("the run stopped with a config error (exit 2); not retried: fix the config")
                        return EXIT_CONFIG
                    if code == 1 and self.job.sweep:
                        self.log(f"the sweep finished with failed runs (exit 1); nestlearn status on a copy of "
                                 f"{self.job.out} names them; rerunning the sweep retries them")  # fmt: skip
                        return code
                    if code is not None and code != EXIT_PREEMPTED:
                        self.log(f"the run crashed (exit {code}); not retried; its log is above")
                        return code
                    state = self.state()
                    why = "preempted (exit 4)" if code == EXIT_PREEMPTED else "lost"
                    self.log(f"the run was {why}; {self.spec.name} is {state or 'gone'}")
                    if self.attempts >= self.max_attempts:
                        self.log(f"giving up after {self.attempts} launches; the run's checkpoints stay in "
                                 f"{self.job.out}: rerun with --resume to continue")  # fmt: skip
                        return EXIT_GAVE_UP
                    waited = 0.0
                    while state in TRANSIENT and waited < self.queue_timeout:  # repairing, restarting...
                        self.sleep(self.poll)
                        waited += self.poll
                        state = self.state()
                    if state != READY:
                        if state:  # PREEMPTED, TERMINATED, SUSPENDED...: the name must be freed first
                            self.delete()
                        self.create()
                        self.setup(archive, wheel)
                    resume = True
            except OSError as e:
                self.log(f"operating error: {e}")
                return EXIT_OPERATING
            finally:
                if created and not self.keep:
                    self.delete()
                elif created:
                    self.log(
                        f"kept {self.spec.name}; delete it with: {shlex.join(gcloud('delete', self.spec))}"
                    )


def add_tpu_parser(sub) -> None:
    """Adds ``nestlearn tpu`` to the CLI's subparsers."""
    p = sub.add_parser(
        "tpu",
        help="run an experiment or sweep on a Cloud TPU VM: create, install, run, babysit, delete",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("experiment", nargs="?", default="", help="experiment name (or give --sweep FILE)")
    p.add_argument(
        "--sweep", default="", metavar="FILE", help="a sweep file to run instead of one experiment"
    )
    p.add_argument("--out", required=True, help="output directory, a gs://bucket/path that every host writes")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resume", action="store_true", help="the first launch continues --out too")
    p.add_argument("--name", required=True, help="the TPU VM's name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-8 (default v4-8)")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version")
    p.add_argument("--project", default="", help="Google Cloud project (default: gcloud's)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
    p.add_argument("--queued", action="store_true", help="request through a queued resource")
    p.add_argument("--best-effort", action="store_true", help="a best-effort queued resource (gcloud alpha)")
    p.add_argument("--max-attempts", type=int, default=5, help="launches before giving up (default 5)")
    p.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
    p.add_argument("--wheel", default=None, help="ship this wheel instead of building one")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between queue checks (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")


def tpu_main(args) -> int:
    """``nestlearn tpu``: builds the spec and the job from parsed arguments and runs the launcher."""
    spec = TpuSpec(
        name=args.name,
        zone=args.zone,
        accelerator_type=args.accelerator_type,
        version=args.version,
        project=args.project,
        spot=args.spot,
        queued=args.queued,
        best_effort=args.best_effort,
    )
    if args.sweep and not Path(args.sweep).is_file():
        raise ConfigError(f"--sweep {args.sweep}: no such file")
    if args.sweep:
        from nestlearn.experiment._sweep import read_sweep

        read_sweep(args.sweep)  # a bad sweep file is refused here, before any VM is created
    job = Job(out=args.out, experiment=args.experiment, sweep=args.sweep, sets=tuple(args.sets),
              quick=args.quick, resume=args.resume)  # fmt: skip
    launcher = Launcher(spec, job, runner=DryRun() if args.dry_run else Runner(), max_attempts=args.max_attempts,
                        keep=args.keep, wheel=args.wheel, poll=args.poll)  # fmt: skip
    return launcher.launch()
