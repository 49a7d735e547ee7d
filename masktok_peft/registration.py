"""Registration of the masktok adapter type with PEFT.

PEFT 0.21 keeps its adapter types in the `PeftType` enum, and `register_peft_method` accepts only
names already in that enum. This module adds one member on import and fills PEFT's three lookup
tables the way `register_peft_method` does.

The member's value is what `adapter_config.json` stores as `peft_type`. A process that loads the
adapter without importing this package fails on PEFT's own lookup of that value, with a
`KeyError` whose text is the value, so the value itself names the fix.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MASKTOK_PEFT_TYPE_NAME = "MASKTOK"
MASKTOK_PEFT_TYPE_VALUE = (
    "MASKTOK (requires the masktok-peft package: pip install masktok-peft, then import masktok_peft)"
)
MASKTOK_PREFIX = "masktok_"


def _add_peft_type_member(name: str, value: str) -> PeftType:
    """Add a member to PEFT's `PeftType` enum, or return it if an earlier import added it."""
    if name in PeftType.__members__:
        return PeftType[name]

    # NOTE: Python's enum has no public API to extend an enum after its class is built. These are
    # the fields that `enum.EnumType` itself fills for each member (CPython 3.10 to 3.13).
    member = str.__new__(PeftType, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


MASKTOK_PEFT_TYPE = _add_peft_type_member(MASKTOK_PEFT_TYPE_NAME, MASKTOK_PEFT_TYPE_VALUE)


def register_masktok(config_cls: type, model_cls: type) -> None:
    """Make PEFT build `model_cls` for configs whose `peft_type` is the masktok member."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[MASKTOK_PEFT_TYPE] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[MASKTOK_PEFT_TYPE] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[MASKTOK_PEFT_TYPE] = MASKTOK_PREFIX
