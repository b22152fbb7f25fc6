"""OML: a meta-learned representation under a prediction head that learns online (Javed & White 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from nestlearn.meta._inner import ApplyFn, LossFn, Params

Metrics = dict[str, Float[Array, ""]]


class OMLParams(flax.struct.PyTreeNode):
    """OML's meta-parameters: the representation network (RLN) and the prediction network's start (PLN).

    Attributes:
      rln: parameters of the representation ``h = rln_apply(rln, x)``, learned only by the meta-gradient.
      pln: the initial parameters of the prediction head, which the online learner adapts.
    """

    rln: PyTree
    pln: PyTree


class OMLTrainState(flax.struct.PyTreeNode):
    """Meta-training state: the meta-parameters, the outer optimizer's state and the iteration (int32)."""

    params: OMLParams
    opt_state: optax.OptState
    step: jax.Array


@final
@flax.struct.dataclass
class OML:
    """Online-aware Meta-Learning: meta-learn a representation on which online SGD forgets little.

    The model is ``pln_apply(W, rln_apply(θ, x))``. The inner learner sees a trajectory of minibatches
    :math:`(X_1, Y_1), ..., (X_S, Y_S)` one at a time and updates the head only, by SGD:

    .. math::
      W_0 = W, \\quad W_{s} = W_{s-1} - β ∇_W ℓ(W_{s-1}; θ, X_s, Y_s), \\qquad
      L_{meta}(θ, W) = ℓ\\big(W_S;\\ θ,\\ X_{rand} ∪ X_{1..S}\\big)

    and the meta-gradient :math:`∇_{(θ, W)} L_{meta}` runs through every online update (second order:
    the updates depend on θ through the features), with ``X_rand`` a "remember" batch of points from the
    trajectory's tasks that the online learner did not see. An outer optimizer (the paper's Adam, meta
    learning rate 1e-4) descends on it. At meta-test θ is frozen and only the head learns the stream.

    ``loss_fn(pln_params, h, y)`` is the head's loss on features ``h`` (e.g.
    ``nestlearn.meta.mse_loss(pln_apply)``); the features of all the trajectory's points are computed once
    per evaluation, since θ does not move within a trajectory.

    Attributes:
      rln_apply: ``rln_apply(rln_params, x) -> h`` (static).
      loss_fn: ``loss_fn(pln_params, h, y) -> scalar``, the head's loss on features (static).
      inner_lr: β, the online SGD learning rate (a pytree leaf; the paper's 0.003).
      checkpoint: rematerialise each online step in the backward pass (static): memory of the unroll is
        then the ``S`` head parameters rather than every step's activations.

    Example:
      >>> from flax import nnx
      >>> from nestlearn.nn import MLP
      >>> from nestlearn.meta import functional, mse_loss
      >>> rln_apply, rln = functional(MLP(11, (32,), 32, rngs=nnx.Rngs(0)))
      >>> pln_apply, pln = functional(MLP(32, (32,), 1, rngs=nnx.Rngs(1)))
      >>> oml = OML(rln_apply, mse_loss(pln_apply))
      >>> params = OMLParams(rln=rln, pln=pln)   # then oml.meta_grad(params, x_traj, y_traj, x_rand, y_rand)

    Reference: K. Javed and M. White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019.
    """

    rln_apply: ApplyFn = flax.struct.field(pytree_node=False)
    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    inner_lr: float = 0.003
    checkpoint: bool = flax.struct.field(pytree_node=False, default=False)

    def learn_online(
        self, rln: Params, pln: Params, x_traj: Float[Array, "s b ..."], y_traj: Array
    ) -> tuple[Params, Float[Array, " s"]]:
        """Online SGD of the head over the minibatches ``x_traj[s]`` in order (differentiable in both).

        Returns:
          ``(W_S, losses)``: the head after the stream and the loss of each minibatch before its update.
        """
        s, b = x_traj.shape[:2]
        h = self.rln_apply(rln, x_traj.reshape((s * b,) + x_traj.shape[2:]))
        h = h.reshape((s, b) + h.shape[1:])

        def step(w, batch):
            hs, ys = batch
            loss, g = jax.value_and_grad(self.loss_fn)(w, hs, ys)
            return jax.tree.map(lambda p, gp: p - self.inner_lr * gp, w, g), loss

        if self.checkpoint:
            step = jax.checkpoint(step, prevent_cse=False)
        return jax.lax.scan(step, pln, (h, y_traj))

    def meta_loss(
        self,
        params: OMLParams,
        x_traj: Float[Array, "s b ..."],
        y_traj: Array,
        x_rand: Float[Array, "m ..."],
        y_rand: Array,
    ) -> tuple[Float[Array, ""], Metrics]:
        """:math:`L_{meta}`: the adapted head's loss on the remember batch and the whole trajectory.

        Returns:
          ``(loss, metrics)``: ``metrics`` holds ``loss_online`` (mean loss of the minibatches as they
          arrived, before each update) and ``loss_rand`` (the adapted model on the remember batch alone).
        """
        w, online = self.learn_online(params.rln, params.pln, x_traj, y_traj)
        s, b = x_traj.shape[:2]
        xs = x_traj.reshape((s * b,) + x_traj.shape[2:])
        ys = y_traj.reshape((s * b,) + y_traj.shape[2:])
        x_all = jnp.concatenate([x_rand, xs], axis=0)
        y_all = jnp.concatenate([y_rand, ys], axis=0)
        loss = self.loss_fn(w, self.rln_apply(params.rln, x_all), y_all)
        rand = self.loss_fn(w, self.rln_apply(params.rln, x_rand), y_rand)
        return loss, {"loss_online": jnp.mean(online), "loss_rand": rand, "loss_meta": loss}

    def meta_grad(
        self,
        params: OMLParams,
        x_traj: Float[Array, "s b ..."],
        y_traj: Array,
        x_rand: Float[Array, "m ..."],
        y_rand: Array,
    ) -> tuple[OMLParams, Metrics]:
        """:math:`∇_{(θ, W)} L_{meta}` through the online updates, and the metrics of :meth:`meta_loss`."""
        grads, metrics = jax.grad(self.meta_loss, has_aux=True)(params, x_traj, y_traj, x_rand, y_rand)
        return grads, metrics

    def meta_test(
        self,
        params: OMLParams,
        x_traj: Float[Array, "s b ..."],
        y_traj: Array,
        x_eval: Float[Array, "k m ..."],
        y_eval: Array,
    ) -> tuple[OMLParams, Float[Array, " k"]]:
        """Meta-test: the RLN frozen, the head learns the stream online, then each task is scored.

        Args:
          params: meta-learned parameters.
          x_traj, y_traj: the stream's minibatches in order (``[S, B, ...]``).
          x_eval, y_eval: held-out points of each of the ``k`` tasks (``[k, m, ...]``).

        Returns:
          ``(params_after, losses)``: the RLN unchanged with the head after the stream, and the loss on each
          task's held-out points after the whole stream (the forgetting picture: early tasks versus late).
        """
        params = jax.lax.stop_gradient(params)
        w, _ = self.learn_online(params.rln, params.pln, x_traj, y_traj)
        losses = jax.vmap(lambda xe, ye: self.loss_fn(w, self.rln_apply(params.rln, xe), ye))(x_eval, y_eval)
        return params.replace(pln=w), losses

    def train_init(self, params: OMLParams, optimizer: optax.GradientTransformation) -> OMLTrainState:
        """Meta-training state at iteration 0."""
        return OMLTrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def meta_train(
        self,
        state: OMLTrainState,
        key: PRNGKeyArray,
        sample: Callable[[PRNGKeyArray], tuple[Array, Array, Array, Array]],
        optimizer: optax.GradientTransformation,
        n_iters: int,
    ) -> tuple[OMLTrainState, Metrics]:
        """``n_iters`` meta-iterations in one ``lax.scan`` (wrap in ``jax.jit`` with the statics closed over).

        Iteration ``i`` draws its trajectory from ``sample(fold_in(key, state.step + i))``, which returns
        ``(x_traj, y_traj, x_rand, y_rand)``. For the incremental sine (:class:`nestlearn.tasks.IncrementalSine`)::

            def sample(k):
                traj = family.sample_trajectory(k, pool)
                return (*traj.online(), *traj.remember())

        The paper's optimizer is ``optax.adam(1e-4)``.

        Returns:
          ``(state, metrics)`` with each metric of :meth:`meta_loss` per iteration (``[n_iters]``).
        """

        def body(st: OMLTrainState, _):
            grads, metrics = self.meta_grad(st.params, *sample(jax.random.fold_in(key, st.step)))
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            params = optax.apply_updates(st.params, updates)
            return OMLTrainState(params=params, opt_state=opt_state, step=st.step + 1), metrics

        return jax.lax.scan(body, state, length=n_iters)
