"""Split MNIST baselines in one scenario (van de Ven, Tuytelaars & Tolias 2022): naive, EWC, SI, LwF,
replay and joint.

Command:  nestlearn run split_mnist_baselines --set data.scenario=task    (or domain, class; the
          EWC / SI strengths below are the task-incremental ones: set ewc.lam / si.c per scenario as
          listed under Setup). --quick: 2 seeds, 100 steps per task.
Runtime:  about 6 minutes per scenario on 2 CPU cores; --quick about 1 minute.
Produces: results/summary.csv (ACC and forgetting per strategy and seed), accuracy matrices, curves;
          the reproduction table of the issue-3 note.
Setup:    the protocol of van de Ven et al.'s public code on the bundled 5k MNIST (not full MNIST, so
          absolute numbers differ): 5 tasks of two digits, MLP 784-400-400 ReLU, Adam lr 1e-3, batch
          128, replay 100 examples per class (a 1,000-example reservoir buffer here); EWC lam 1e5 / 1e10 /
          1e9 and SI c 10 / 5e4 / 5e3 for task / domain / class incremental. One change, for time:
          500 iterations per task instead of 2,000 (set train.steps_per_task=2000 for the original).
"""

from nestlearn.continual import EWC, SI, LwF, Replay
from nestlearn.experiment import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainSpec

CONFIG = ExperimentConfig(
    data=DataConfig(stream="split_mnist", scenario="task", n_tasks=5),
    model=ModelConfig(hidden=(400, 400)),
    optim=OptimConfig(name="adam", lr=0.001),
    train=TrainSpec(steps_per_task=500, batch_size=128, evals_per_task=5),
    strategies=("naive", "ewc", "si", "lwf", "replay", "joint"),
    ewc=EWC(lam=1e5),
    si=SI(c=10.0),
    lwf=LwF(alpha=1.0),
    replay=Replay(buffer_size=1000),
    seeds=3,
)

QUICK = ["seeds=2", "train.steps_per_task=100"]
