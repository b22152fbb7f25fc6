"""Meta-learning: MAML-style learned initialisations, as functions of parameter pytrees.

Every algorithm meta-learns where (and, for Meta-SGD, how fast) an inner loop starts, so that a few
steps on a task's support set fit its query set. The inner loop (:func:`adapt`) runs any optax
transform under ``lax.scan``, differentiable to second order, with optional rematerialisation
(``checkpoint="step"`` or the sqrt(N) ``"segments"`` schedule) and truncated backpropagation. The
learners share one small interface (:class:`MetaLearner`: ``init``, ``inner_problem``,
``meta_grad``, ``params``, ``adapt``, ``evaluate``) and differ in their outer estimator:

- :class:`MAML`: the exact meta-gradient through the unroll; ``first_order=True`` is first-order MAML.
- :class:`MetaSGD`: MAML plus a learned inner rate per parameter, stored as ``log_lr``.
- :class:`ANIL`: only the head adapts; body and head are meta-learned through the unroll.
- :class:`Reptile`: the pseudo-gradient ``θ − φ``, no derivative of the inner loop.
- :class:`OML`: a meta-learned representation under a head that learns online (continual learning).
- :class:`LaMAML`: look-ahead MAML with learned, clipped per-parameter rates and replay (online).
- :class:`IMAML`: a proximal inner problem whose meta-gradient comes from conjugate gradient on
  Hessian-vector products (memory independent of the number of inner steps).

:class:`MetaTrainer` runs chunks of meta-iterations as one compiled call, and seeds as one program.
Any Flax NNX model enters through :func:`functional`.
"""

from nestlearn.meta._base import InnerProblem, MetaLearner
from nestlearn.meta._imaml import IMAML
from nestlearn.meta._inner import (
    CHECKPOINT_MODES,
    adapt,
    adapt_trajectory,
    cross_entropy_loss,
    functional,
    mse_loss,
    plain_path,
)
from nestlearn.meta._lamaml import LaMAML, LaMAMLState
from nestlearn.meta._maml import ANIL, MAML, MetaSGD, MetaSGDParams
from nestlearn.meta._oml import OML, OMLParams, OMLTrainState
from nestlearn.meta._reptile import Reptile
from nestlearn.meta._train import MetaTrainer, MetaTrainState, meta_train

__all__ = [
    "ANIL",
    "CHECKPOINT_MODES",
    "IMAML",
    "MAML",
    "InnerProblem",
    "LaMAML",
    "LaMAMLState",
    "MetaLearner",
    "MetaSGD",
    "MetaSGDParams",
    "MetaTrainState",
    "MetaTrainer",
    "OML",
    "OMLParams",
    "OMLTrainState",
    "Reptile",
    "adapt",
    "adapt_trajectory",
    "cross_entropy_loss",
    "functional",
    "meta_train",
    "mse_loss",
    "plain_path",
]
