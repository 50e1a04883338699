"""The agent Meta-World's evaluation protocol drives: ``metaworld.evaluation.MetaLearningAgent``
over a :class:`~metarl_lightning.module.MetaRLModule`, one parameter set per env (= task), adapted
with the module's own inner update. :mod:`metarl_lightning.evaluation` builds the envs and runs the
protocol with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from metaworld.evaluation import Timestep

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.algorithms.ppo import gaussian_log_prob
from metarl_lightning.policies.acting import ActingStep
from metarl_lightning.rollout_data import Rollout
from metarl_lightning.trials import value_boundaries


class MetaWorldAgent:
    """``metaworld.evaluation.MetaLearningAgent`` over a :class:`MetaRLModule` (MAML + PPO).

    Env ``k`` of the eval vector env is agent ``k``: it starts from the meta-parameters theta at
    :meth:`init`, samples actions with its own parameters while adapting, and after :meth:`adapt`
    acts deterministically (the Gaussian mean) with its adapted theta_k'.

    GAE and truncation: metaworld's loop hands the agent no final observation of a truncated
    episode (with same-step autoreset, ``next_obs`` is already the next episode's first). We
    bootstrap a truncated step with the value of that step's own observation, V(s_t) instead of
    V(s_{t+1}): one step off, where the alternative (no bootstrap) would treat the time limit as a
    failure state. Terminations (success with terminate-on-success) do not bootstrap.

    Recurrent state is zeroed at every episode start, as the collector's ``reset_state_on="episode"``;
    with ``trial_memory`` only at :meth:`init` (a new task), so it is carried from the first
    adaptation episode into the last evaluation episode (the protocol's ``reset`` calls at episode
    ends are ignored). With ``eval_state="adapted"`` every evaluation episode instead starts from the
    state the adaptation episodes left (the Meta-World+ reference RL^2 agent's choice): what was
    learnt about the task stays, what one evaluation episode did is forgotten. The inner step is taken only when the module has ``inner_steps > 0``; with
    0 (RL^2) the agent adapts in context alone and acts with theta throughout.

    Args:
        module: the meta-learner (its ``policy``, ``_adapt`` and ``hparams`` gamma/gae_lambda).
        num_envs: envs in the eval vector env.
        observation_suffix: ``[num_envs, X]`` appended to every observation (MT task one-hots).
        action_limit: actions sent to the env are clipped to ``[-action_limit, action_limit]``.
        seed: seeds the exploration noise of adaptation.
        sample_eval_actions: evaluate with sampled instead of mean actions.
        trial_memory: keep the recurrent state over all episodes of a task (see above).
        eval_state: with ``trial_memory``, where an evaluation episode starts: ``carry`` (from where
            the previous episode ended) or ``adapted`` (from the state at :meth:`adapt`).
    """

    def __init__(
        self,
        module: Any,
        num_envs: int,
        observation_suffix: npt.NDArray | None = None,
        action_limit: float = 1.0,
        seed: int = 0,
        sample_eval_actions: bool = False,
        trial_memory: bool = False,
        eval_state: str = "carry",
    ) -> None:
        if eval_state not in ("carry", "adapted"):
            raise ValueError(f"eval_state: must be 'carry' or 'adapted', got {eval_state!r}")
        self.module = module
        self.eval_state = eval_state
        self.policy = module.policy
        self.sample_eval_actions = sample_eval_actions
        self.trial_memory = trial_memory
        self.inner_steps = int(module.hparams.get("inner_steps", 1))
        # Acting follows the module's device (a GPU-trained module evaluates where it lives).
        self.device = next(self.policy.parameters()).device
        self.num_envs = num_envs
        self.action_limit = action_limit
        self.suffix = None if observation_suffix is None else np.asarray(observation_suffix, dtype=np.float32)
        self.generator = torch.Generator().manual_seed(seed)
        self.params: dict[str, torch.Tensor] = {}
        self.init()

    # -------------------------------------------------------------------------------- helpers
    def _initial_state(self) -> torch.Tensor:
        """Zero recurrent state, ``[K, 1, *S]`` (one env per agent)."""
        state = self.policy.initial_state(self.num_envs, device=self.device)
        return state.reshape(self.num_envs, 1, *state.shape[1:])

    def _obs(self, observations: npt.NDArray) -> torch.Tensor:
        """The policy input, as in training: env observation (and context inputs), task one-hot,
        then the module's observation normalisation (``model.normalize_observations``)."""
        obs = np.asarray(observations, dtype=np.float32)
        if self.suffix is not None:
            obs = np.concatenate([obs, self.suffix], axis=1)
        normalizer = getattr(self.module, "obs_normalizer", None)
        if normalizer is not None:
            obs = normalizer.normalize(obs)
        return torch.as_tensor(obs, device=self.device)

    def _forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step for all envs with their own parameters; advances the recurrent state."""
        K = self.num_envs
        if self._acting is None:
            # The policy's acting step for the current parameters (one env per agent), as in the
            # collector; rebuilt whenever the parameters change (init, adapt).
            # The critic runs only while its values feed the adaptation's advantages.
            self._acting = self.policy.acting_step(self.params, K, 1, with_values=self._with_values)
            self.state = self._acting.initial_state()
        if self.pending_restore.any():  # evaluation episodes starting from the adapted state
            self.state = self._acting.select_state(self.pending_restore.reshape(K, 1), self.adapted_state, self.state)
            self.pending_restore = torch.zeros(K, dtype=torch.bool, device=self.device)
        out = self._acting(obs.reshape(K, 1, -1), self.state, self.pending_reset.reshape(K, 1))
        self.state = out.state
        self.pending_reset = torch.zeros(K, dtype=torch.bool, device=self.device)
        value = out.value[:, 0] if out.value is not None else torch.zeros(K, dtype=out.mean.dtype, device=self.device)
        return out.mean[:, 0], out.log_std.expand_as(out.mean)[:, 0], value

    def _sample(self, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        """Gaussian actions around ``mean`` from the agent's own seeded generator (unclipped)."""
        noise = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype).to(self.device)
        return mean + torch.exp(log_std) * noise

    # -------------------------------------------------------------------------------- protocol
    def init(self) -> None:
        """Every env's parameters back to theta; clear the adaptation buffer and the state."""
        theta = {k: v.detach() for k, v in self.policy.named_parameters()}
        self.params = stack_for_agents(theta, self.num_envs)
        self._acting: ActingStep | None = None  # built from self.params at the first step
        self._with_values = self.module.hparams.get("baseline", "critic") == "critic"
        self.pending_reset = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self.pending_restore = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.adapted_state: Any = None  # eval_state "adapted": the state at adapt(), in the step's layout
        self.buffer: dict[str, list[torch.Tensor]] = {}

    def reset(self, env_mask: npt.NDArray[np.bool_]) -> None:
        """Zero the recurrent state of the envs in ``env_mask`` before their next step.

        A trial-memory agent ignores it: the protocol calls it at episode ends, inside the trial; with
        ``eval_state="adapted"`` those envs restart from the adapted state once adaptation is done.
        """
        if self.trial_memory:
            if self.adapted_state is not None:
                self.pending_restore = self.pending_restore | torch.as_tensor(np.asarray(env_mask, dtype=bool), device=self.device)
            return
        self.pending_reset = self.pending_reset | torch.as_tensor(np.asarray(env_mask, dtype=bool), device=self.device)

    @torch.no_grad()
    def eval_action(self, observations: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Mean actions with each env's current (adapted) parameters (samples with ``sample_eval_actions``)."""
        mean, log_std, _ = self._forward(self._obs(observations))
        action = self._sample(mean, log_std) if self.sample_eval_actions else mean
        return action.clamp(-self.action_limit, self.action_limit).cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def adapt_action(
        self, observations: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], dict[str, npt.NDArray]]:
        """Sampled, clipped actions; the aux dict carries what :meth:`step` stores.

        Aux keys: ``obs`` (the policy input), ``raw_action`` (the unclipped sample the log-prob refers
        to), ``log_prob``, ``value``, ``reset`` (state was zeroed before this step).
        """
        obs = self._obs(observations)
        reset = self.pending_reset.clone()
        mean, log_std, value = self._forward(obs)
        action = self._sample(mean, log_std)
        aux = {
            "obs": obs.cpu().numpy(),
            "raw_action": action.cpu().numpy(),
            "log_prob": gaussian_log_prob(mean, log_std, action).cpu().numpy(),
            "value": value.cpu().numpy(),
            "reset": reset.cpu().numpy(),
        }
        return action.clamp(-self.action_limit, self.action_limit).cpu().numpy().astype(np.float64), aux

    def step(self, timestep: Timestep) -> None:
        """Record one transition of every env; zero the state of envs whose episode ended."""
        if self.inner_steps == 0:  # nothing will adapt on the data: keep none of it
            self.reset(np.logical_or(timestep.terminated, timestep.truncated))
            return
        aux = timestep.aux_policy_outputs
        record = {
            "observations": torch.as_tensor(aux["obs"]),
            "actions": torch.as_tensor(aux["raw_action"]),
            "log_probs": torch.as_tensor(aux["log_prob"]),
            "values": torch.as_tensor(aux["value"]),
            "resets": torch.as_tensor(aux["reset"]),
            "rewards": torch.as_tensor(np.asarray(timestep.reward, dtype=np.float32)),
            "terminated": torch.as_tensor(np.asarray(timestep.terminated, dtype=bool)),
            "truncated": torch.as_tensor(np.asarray(timestep.truncated, dtype=bool)),
        }
        for key, value in record.items():
            self.buffer.setdefault(key, []).append(value)
        self.reset(np.logical_or(timestep.terminated, timestep.truncated))

    def adaptation_rollout(self) -> Rollout:
        """The recorded adaptation data as a ``[K, 1, T, ...]`` rollout with GAE computed."""
        data = {k: torch.stack(v, dim=1).unsqueeze(1).to(self.device) for k, v in self.buffer.items()}  # (K 1 T ...)
        values, terminated, truncated = data["values"], data["terminated"], data["truncated"]
        # Inside an episode (or a trial) V(s_{t+1}) is the next step's value; on a truncation that
        # ends the return V(s_t) (class doc); on termination 0. The last step, still running,
        # bootstraps with its own value as well.
        following = torch.cat([values[..., 1:], values[..., -1:]], dim=-1)
        ends_terminated, ends_truncated = value_boundaries(terminated, truncated, data["resets"])
        next_values = torch.where(ends_terminated | ends_truncated, values, following)
        next_values = torch.where(ends_terminated, torch.zeros_like(values), next_values)
        done = terminated | truncated
        K = self.num_envs
        rollout = Rollout(
            next_values=next_values,
            initial_state=self._initial_state(),
            episode_return=data["rewards"].sum(dim=(1, 2)) / done.sum(dim=(1, 2)).clamp(min=1),
            episode_success=torch.zeros(K, device=self.device),
            **data,
        )
        self.module.compute_advantages(rollout)
        return rollout

    def adapt(self) -> None:
        """theta_k' from env ``k``'s adaptation data with the module's inner update (first order).

        Without inner steps (``inner_steps: 0``) the parameters stay theta. A trial-memory agent
        keeps its state (and its adaptation data: a further adaptation step sees the whole trial
        so far, which starts from the zero state its rollout is recomputed from).
        """
        if self.inner_steps > 0:
            rollout = self.adaptation_rollout()
            with torch.enable_grad():
                leaf = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
                adapted = self.module._adapt(leaf, rollout, first_order=True)
            self.params = {k: v.detach() for k, v in adapted.items()}
        if self.trial_memory:
            if self.inner_steps > 0 and self._acting is not None:
                # The new parameters' acting step, continuing the state: built like the old one
                # (same agents, envs and critic setting), it has the same state layout.
                state = self.state
                self._acting = self.policy.acting_step(self.params, self.num_envs, 1, with_values=self._with_values)
                self.state = state
            if self.eval_state == "adapted" and self._acting is not None:
                self.adapted_state = self.state
            return
        self._acting = None
        self._with_values = False  # evaluation acts with the mean only
        self.buffer = {}
        self.pending_reset = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
