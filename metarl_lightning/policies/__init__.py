"""Actor-critic policies."""

from metarl_lightning.policies.base import ActorCritic, PolicyOutput
from metarl_lightning.policies.mlp import MLPActorCritic
