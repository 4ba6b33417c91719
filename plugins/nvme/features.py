# SPDX-License-Identifier: BSD-2-Clause
"""Get Features and Set Features (NVMe 1.4 §5.9, §5.21) and the controller's feature
values, a record that a reset puts back to its defaults.

Offered: Arbitration, Power Management (power state 0 only), Temperature Threshold
(the composite sensor; crossing it sets the SMART temperature warning), Error Recovery
(DULBE refused: deallocated blocks are not reported as errors), Volatile Write Cache
(when there is one), Number of Queues (until an I/O queue exists, then Command
Sequence Error), Interrupt Coalescing (kept, not applied: every completion
interrupts), Interrupt Vector Configuration, Write Atomicity Normal and Asynchronous
Event Configuration. Nothing can be saved. Other features are Invalid Field.
"""

from __future__ import annotations

import attrs

from hvf.plugins.nvme.identify import WARNING_TEMP
from hvf.plugins.nvme.spec import (
    COMMAND_SEQUENCE_ERROR,
    FEAT_ARBITRATION,
    FEAT_ASYNC_EVENT_CONFIG,
    FEAT_ERROR_RECOVERY,
    FEAT_INTERRUPT_COALESCING,
    FEAT_INTERRUPT_VECTOR_CONFIG,
    FEAT_NUMBER_OF_QUEUES,
    FEAT_POWER_MANAGEMENT,
    FEAT_TEMPERATURE_THRESHOLD,
    FEAT_VOLATILE_WRITE_CACHE,
    FEAT_WRITE_ATOMICITY,
    FEATURE_NOT_SAVEABLE,
    INVALID_FIELD,
    SEL_CAPABILITIES,
    SEL_CURRENT,
    SET_SAVE,
    SUCCESS,
)
from hvf.snapshot_api import Fields, check_fields, field_int

#: Supported capabilities (Get Features select 3): changeable, namespace specific.
CAP_CHANGEABLE, CAP_NAMESPACE = 1 << 2, 1 << 1
_COALESCE_DISABLE = 1 << 16
_DULBE = 1 << 16
#: Async Event Configuration bits defined by 1.4 (SMART warnings and notices).
_ASYNC_EVENT_BITS = 0x7FFF

Result = tuple[int, int]  # status, completion dword 0


@attrs.define
class Features:
    """The current value of every feature (plain integers, as Set Features gives them)."""

    arbitration: int
    power_management: int
    temperature_over: int
    temperature_under: int
    error_recovery: int
    write_cache: int
    #: Number of Queues: I/O submission queues (bits 15:0) and completion queues
    #: (31:16) allocated, both 0-based.
    queues: int
    coalescing: int
    #: Interrupt Vector Configuration: bit v set when vector v has coalescing disabled.
    coalescing_disabled: int
    write_atomicity: int
    async_events: int

    @classmethod
    def defaults(cls, maxq: int, write_cache: bool) -> Features:
        return cls(arbitration=0, power_management=0, temperature_over=WARNING_TEMP,
                   temperature_under=0, error_recovery=0, write_cache=int(write_cache),
                   queues=(maxq - 1) * 0x1_0001, coalescing=0, coalescing_disabled=0,
                   write_atomicity=0, async_events=0)

    @property
    def io_queues(self) -> int:
        """How many I/O queue pairs the host may create (the smaller allocation, 1-based)."""
        return min(self.queues & 0xFFFF, self.queues >> 16) + 1

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, maxq: int) -> Features:
        """Rebuild; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        features = cls(**{name: field_int(fields, name, 32) for name in attrs.fields_dict(cls)})
        if max(features.queues & 0xFFFF, features.queues >> 16) >= maxq:
            raise ValueError("saved field 'queues' allocates more queues than the controller has")
        return features


def get_feature(features: Features, defaults: Features, fid: int, cdw11: int,
                select: int) -> Result:
    """Get Features: the current, default or saved (the default) value, or the
    feature's capabilities."""
    known = _GET.get(fid)
    if known is None or select > SEL_CAPABILITIES:
        return INVALID_FIELD, 0
    if select == SEL_CAPABILITIES:
        return SUCCESS, CAP_CHANGEABLE | (CAP_NAMESPACE if fid == FEAT_ERROR_RECOVERY else 0)
    return known(features if select == SEL_CURRENT else defaults, cdw11)


def _temperature_get(f: Features, cdw11: int) -> Result:
    selector = cdw11 >> 16 & 0x3F
    if selector not in (0x00, 0x10):  # the composite sensor, over or under
        return INVALID_FIELD, 0
    return SUCCESS, selector << 16 | (f.temperature_under if selector else f.temperature_over)


def _vector_get(f: Features, cdw11: int) -> Result:
    vector = cdw11 & 0xFFFF
    return SUCCESS, vector | (_COALESCE_DISABLE if f.coalescing_disabled >> vector & 1 else 0)


_GET = {
    FEAT_ARBITRATION: lambda f, _: (SUCCESS, f.arbitration),
    FEAT_POWER_MANAGEMENT: lambda f, _: (SUCCESS, f.power_management),
    FEAT_TEMPERATURE_THRESHOLD: _temperature_get,
    FEAT_ERROR_RECOVERY: lambda f, _: (SUCCESS, f.error_recovery),
    FEAT_VOLATILE_WRITE_CACHE: lambda f, _: (SUCCESS, f.write_cache),
    FEAT_NUMBER_OF_QUEUES: lambda f, _: (SUCCESS, f.queues),
    FEAT_INTERRUPT_COALESCING: lambda f, _: (SUCCESS, f.coalescing),
    FEAT_INTERRUPT_VECTOR_CONFIG: _vector_get,
    FEAT_WRITE_ATOMICITY: lambda f, _: (SUCCESS, f.write_atomicity),
    FEAT_ASYNC_EVENT_CONFIG: lambda f, _: (SUCCESS, f.async_events),
}


def set_feature(features: Features, fid: int, cdw10: int, cdw11: int, *, maxq: int,
                vectors: int, write_cache: bool, io_queues_exist: bool) -> Result:
    """Set Features: store a valid value in ``features``."""
    if fid not in _GET:
        return INVALID_FIELD, 0
    if cdw10 & SET_SAVE:
        return FEATURE_NOT_SAVEABLE, 0
    if fid == FEAT_ARBITRATION:
        features.arbitration = cdw11
    elif fid == FEAT_POWER_MANAGEMENT:
        if cdw11 & 0x1F:  # only power state 0 exists
            return INVALID_FIELD, 0
        features.power_management = cdw11 & 0xFF
    elif fid == FEAT_TEMPERATURE_THRESHOLD:
        selector = cdw11 >> 16 & 0x3F
        if selector & 0xF not in (0x0, 0xF) or selector >> 4 > 1:
            return INVALID_FIELD, 0
        if selector >> 4:
            features.temperature_under = cdw11 & 0xFFFF
        else:
            features.temperature_over = cdw11 & 0xFFFF
    elif fid == FEAT_ERROR_RECOVERY:
        if cdw11 & _DULBE:
            return INVALID_FIELD, 0
        features.error_recovery = cdw11 & 0xFFFF
    elif fid == FEAT_VOLATILE_WRITE_CACHE:
        if not write_cache:
            return INVALID_FIELD, 0
        features.write_cache = cdw11 & 1
    elif fid == FEAT_NUMBER_OF_QUEUES:
        return _set_queues(features, cdw11, maxq, io_queues_exist)
    elif fid == FEAT_INTERRUPT_COALESCING:
        features.coalescing = cdw11 & 0xFFFF
    elif fid == FEAT_INTERRUPT_VECTOR_CONFIG:
        vector = cdw11 & 0xFFFF
        if vector >= vectors:
            return INVALID_FIELD, 0
        bit = 1 << vector
        features.coalescing_disabled = (features.coalescing_disabled & ~bit
                                        | (bit if cdw11 & _COALESCE_DISABLE else 0))
    elif fid == FEAT_WRITE_ATOMICITY:
        features.write_atomicity = cdw11 & 1
    else:
        features.async_events = cdw11 & _ASYNC_EVENT_BITS
    return SUCCESS, 0


def _set_queues(features: Features, cdw11: int, maxq: int, io_queues_exist: bool) -> Result:
    submission, completion = cdw11 & 0xFFFF, cdw11 >> 16
    if 0xFFFF in (submission, completion):
        return INVALID_FIELD, 0
    if io_queues_exist:
        return COMMAND_SEQUENCE_ERROR, 0
    features.queues = min(submission, maxq - 1) | min(completion, maxq - 1) << 16
    return SUCCESS, features.queues
