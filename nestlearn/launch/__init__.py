"""Launching on Cloud TPUs: one tested builder of every ``gcloud`` command, and the babysitting launcher.

* :func:`gcloud` / :class:`TpuSpec`: the argv of each gcloud command (create, describe, delete, scp, ssh)
  for a TPU VM or a queued resource.
* :class:`Launcher` / :class:`Job`: ``nestlearn tpu``: create, copy and install, run on ``--worker=all``,
  relaunch with ``--resume`` after a preemption, delete.
"""

from nestlearn.launch._gcloud import TpuSpec, gcloud
from nestlearn.launch._launcher import DryRun, Job, Launcher, Runner, add_tpu_parser, build_bundle, tpu_main

__all__ = [
    "DryRun",
    "Job",
    "Launcher",
    "Runner",
    "TpuSpec",
    "add_tpu_parser",
    "build_bundle",
    "gcloud",
    "tpu_main",
]
