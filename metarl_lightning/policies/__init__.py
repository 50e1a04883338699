"""Actor-critic policies."""

from metarl_lightning.policies.base import ActorCritic, PolicyOutput
from metarl_lightning.policies.mlp import MLPActorCritic
from metarl_lightning.policies.gru import GRUActorCritic
from metarl_lightning.policies.ssm import S5
from metarl_lightning.policies.ssm_actor_critic import SSMActorCritic

__all__ = ["ActorCritic", "GRUActorCritic", "MLPActorCritic", "PolicyOutput", "S5", "SSMActorCritic"]
