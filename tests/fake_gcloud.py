"""A fake ``gcloud`` for the launcher's tests: records every call and simulates a TPU VM's life.

Installed on ``PATH`` as ``gcloud`` by the ``fake_gcloud`` fixture of tests/test_launcher.py. Every call's
argv (without ``gcloud``) is appended as one JSON line to ``$FAKE_GCLOUD_LOG``. The simulated world lives
in the JSON file ``$FAKE_GCLOUD_STATE``: ``vm`` (absent, READY, PREEMPTED, ...; a queued resource shows
ACTIVE), ``queue`` (states a queued resource's describe reports before ACTIVE), and ``runs``, the outcome
of each successive run launched over ssh:

* ``ok``: a few log lines, then ``nestlearn-exit 0`` from each of two workers;
* ``preempt``: a log line, then the VM becomes PREEMPTED and ssh drops (exit 255, no exit marker);
* ``exit4``: the run checkpointed and exited 4 (preempted; the VM stays READY);
* ``config``: the run exits 2;
* ``crash``: the run exits 1.
"""

import json
import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    path = os.environ["FAKE_GCLOUD_STATE"]
    with open(path) as f:
        world = json.load(f)
    queued = "queued-resources" in argv
    verb = argv[argv.index("queued-resources" if queued else "tpu-vm") + 1]
    code = 0
    if verb == "create":
        world["vm"] = "CREATING" if queued and world.get("queue") else "READY"
    elif verb == "describe":
        if world.get("vm", "absent") == "absent":
            print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
            code = 1
        elif queued and world.get("queue"):
            print(world["queue"].pop(0))
        elif queued:
            world["vm"] = "READY" if world["vm"] in ("CREATING", "READY") else world["vm"]
            print("ACTIVE" if world["vm"] == "READY" else "SUSPENDED")
        else:
            print(world["vm"])
    elif verb == "delete":
        world["vm"] = "absent"
    elif verb == "scp":
        if not os.path.isfile(argv[argv.index("scp") + 1]):
            print("scp: no such file", file=sys.stderr)
            code = 1
    elif verb == "ssh":
        command = next(a for a in argv if a.startswith("--command="))
        if world.get("vm") != "READY":
            print("ERROR: the TPU is not READY", file=sys.stderr)
            code = 255
        elif "nestlearn-exit" in command:
            outcome = world["runs"].pop(0)
            workers = (0, 1)
            if outcome == "ok":
                for w in workers:
                    print(f"worker {w}: [naive] task 1/1 done")
                    print("nestlearn-exit 0")
            elif outcome == "preempt":
                print("worker 0: [naive] task 1/3 done")
                world["vm"] = "PREEMPTED"
                code = 255
            else:
                code = {"exit4": 4, "config": 2, "crash": 1}[outcome]
                for _ in workers:
                    print(f"nestlearn-exit {code}")
    with open(path, "w") as f:
        json.dump(world, f)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
