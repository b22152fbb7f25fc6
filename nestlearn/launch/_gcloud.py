"""Every ``gcloud`` command the launcher runs, built by one function from one spec.

The syntax follows the Cloud SDK reference (``gcloud compute tpus tpu-vm`` and ``gcloud compute tpus
queued-resources``): a TPU VM is created with ``--zone``, ``--accelerator-type``, ``--version`` (the
runtime, e.g. ``tpu-ubuntu2204-base`` or ``v2-alpha-tpuv5-lite``) and optionally ``--spot``; a queued
resource takes ``--node-id`` and ``--runtime-version`` instead, with ``--spot`` (GA) or
``--best-effort`` (only in ``gcloud alpha``). ``ssh``/``scp`` with ``--worker=all`` reach every host of
a multi-host slice.
"""

from __future__ import annotations

import dataclasses
import re

from nestlearn._errors import ConfigError

ACTIONS = ("create", "describe", "delete", "scp", "ssh")

# Node states (TPU API v2, Node.State) and queued-resource states (QueuedResourceState.State), mapped to
# what the launcher does about them: READY (ACTIVE for a queued resource) runs, TRANSIENT ones are waited
# for, any other (PREEMPTED, TERMINATED, STOPPED, SUSPENDED, FAILED, ...) is deleted and recreated.
READY = "READY"
QUEUED_READY = "ACTIVE"
TRANSIENT = ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "PROVISIONING")  # wait, then look again


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """A TPU VM (or queued resource) to create.

    Attributes:
      name: the TPU VM's name (also the queued resource's id when ``queued``).
      zone: e.g. ``us-central2-b``.
      accelerator_type: e.g. ``v4-8`` (one host), ``v4-32`` (four hosts), ``v5litepod-8``.
      version: the TPU software version (``--version``; ``--runtime-version`` for a queued resource).
      project: the Google Cloud project; empty uses gcloud's configured ``core/project``.
      spot: Spot capacity (cheaper, preemptible at any time).
      queued: request through a queued resource (waits in a queue until capacity is free).
      best_effort: a best-effort queued resource (``gcloud alpha``; implies ``queued``).
    """

    name: str
    zone: str
    accelerator_type: str = "v4-8"
    version: str = "tpu-ubuntu2204-base"
    project: str = ""
    spot: bool = False
    queued: bool = False
    best_effort: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise ConfigError(
                f"--name {self.name!r}: a TPU name is lowercase letters, digits and hyphens, starting with a "
                "letter (at most 63 characters)"
            )
        if not self.zone:
            raise ConfigError("--zone is required (e.g. us-central2-b)")
        if self.spot and self.best_effort:
            raise ConfigError("--spot and --best-effort are two capacity kinds; give one")


def gcloud(action: str, spec: TpuSpec, *, command: str = "", source: str = "", dest: str = "~/") -> list[str]:
    """The argv of one ``gcloud`` command on ``spec``'s TPU.

    Args:
      action: ``create``, ``describe`` (prints the state only), ``delete``, ``scp`` (``source`` to
        ``dest`` on every worker) or ``ssh`` (runs ``command`` on every worker).
      spec: the TPU.
      command: the shell command ``ssh`` runs.
      source: the local file ``scp`` copies.
      dest: where ``scp`` puts it on each worker.

    Returns:
      The argv, ``gcloud`` first.

    Example:
      >>> gcloud("delete", TpuSpec("exp", "us-central2-b"))
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'exp', '--zone=us-central2-b', '--quiet']
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown gcloud action {action!r}; known: {', '.join(ACTIONS)}")
    tail = [f"--zone={spec.zone}"] + ([f"--project={spec.project}"] if spec.project else [])
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    queued = spec.queued or spec.best_effort
    qr = ["gcloud", *(["alpha"] if spec.best_effort else []), "compute", "tpus", "queued-resources"]
    if action == "create" and queued:
        capacity = ["--spot"] if spec.spot else ["--best-effort"] if spec.best_effort else []
        return [*qr, "create", spec.name, f"--node-id={spec.name}", *tail,
                f"--accelerator-type={spec.accelerator_type}", f"--runtime-version={spec.version}",
                *capacity]  # fmt: skip
    if action == "create":
        return [*vm, "create", spec.name, *tail, f"--accelerator-type={spec.accelerator_type}",
                f"--version={spec.version}", *(["--spot"] if spec.spot else [])]  # fmt: skip
    if action == "describe" and queued:
        return [*qr, "describe", spec.name, *tail, "--format=value(state.state)"]
    if action == "describe":
        return [*vm, "describe", spec.name, *tail, "--format=value(state)"]
    if action == "delete" and queued:
        # --force deletes the queued resource's node too; --quiet answers the prompt
        return [*qr, "delete", spec.name, *tail, "--force", "--quiet"]
    if action == "delete":
        return [*vm, "delete", spec.name, *tail, "--quiet"]
    if action == "scp":
        if not source:
            raise ValueError("scp needs a source")
        return [*vm, "scp", source, f"{spec.name}:{dest}", *tail, "--worker=all"]
    if not command:
        raise ValueError("ssh needs a command")
    return [*vm, "ssh", spec.name, *tail, "--worker=all", f"--command={command}"]
