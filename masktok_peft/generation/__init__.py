"""Multi-token decoding with a masktok adapter: the decoding loop, acceptance policies and statistics."""

from .generate import MaskTokGenerateOutput, generate_with_masktok
from .policies import (
    AcceptancePolicy,
    ConfAdaptPolicy,
    OffPolicy,
    Proposals,
    StaticPolicy,
    VerifyPolicy,
    build_policy,
)

__all__ = [
    "AcceptancePolicy",
    "ConfAdaptPolicy",
    "MaskTokGenerateOutput",
    "OffPolicy",
    "Proposals",
    "StaticPolicy",
    "VerifyPolicy",
    "build_policy",
    "generate_with_masktok",
]
