# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI controller's saved state: plain records, each rebuilt from untrusted fields
by a validating ``from_fields``.

A snapshot is taken with every command drained (the back ends have finished, so no
slot is in flight): a port's record is its registers, with PxCI and PxSACT holding the
commands the guest issued that have not completed; on restore the port starts them
again. Each drive adds its own record (:class:`DiskState`, :class:`CdromState`).
"""

from __future__ import annotations

from typing import Any

import attrs

from hvf.plugins.ahci.spec import (
    CMD_POD,
    CMD_ST,
    CMD_STORED,
    IS_MASK,
    MAX_PORTS,
    SCTL_WRITABLE,
    SIG_ATA,
    SIG_NONE,
    ST_OK,
    TFD_NONE,
)
from hvf.snapshot_api import Fields, check_fields, field_bytes, field_flags, field_int

def _flag(fields: Fields, name: str) -> bool:
    value = fields.get(name)
    if type(value) is not bool:
        raise ValueError(f"saved field '{name}' is not a bool")
    return value


@attrs.define
class PortState:
    """A port's registers (PxCMD without its status bits, CCS apart), whether it is
    halted after an error, and whether a soft reset (SRST) is in progress."""

    clb: int = 0
    fb: int = 0
    irq_status: int = 0
    irq_enable: int = 0
    cmd: int = 0
    ccs: int = 0
    tfd: int = TFD_NONE
    sig: int = SIG_NONE
    ssts: int = 0
    sctl: int = 0
    serr: int = 0
    sact: int = 0
    ci: int = 0
    halted: bool = False
    soft_reset: bool = False

    @classmethod
    def empty(cls) -> PortState:
        """A port with nothing behind it (not in PI)."""
        return cls()

    @classmethod
    def initial(cls, signature: int) -> PortState:
        """A port after reset with a device of ``signature`` on it: link up at 6 Gb/s,
        the device ready (an ATAPI device without DRDY), diagnostics passed."""
        status = ST_OK if signature == SIG_ATA else 0
        return cls(cmd=CMD_POD, tfd=0x100 | status, sig=signature, ssts=0x133)

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> PortState:
        """Rebuild; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        state = cls(
            clb=field_int(fields, "clb", 64), fb=field_int(fields, "fb", 64),
            irq_status=field_flags(fields, "irq_status", 32, IS_MASK),
            irq_enable=field_flags(fields, "irq_enable", 32, IS_MASK),
            cmd=field_flags(fields, "cmd", 32, CMD_STORED | CMD_POD),
            ccs=field_int(fields, "ccs", 5),
            tfd=field_int(fields, "tfd", 16), sig=field_int(fields, "sig", 32),
            ssts=field_int(fields, "ssts", 12),
            sctl=field_flags(fields, "sctl", 32, SCTL_WRITABLE),
            serr=field_int(fields, "serr", 32), sact=field_int(fields, "sact", 32),
            ci=field_int(fields, "ci", 32), halted=_flag(fields, "halted"),
            soft_reset=_flag(fields, "soft_reset"))
        if state.clb % 1024 or state.fb % 256:
            raise ValueError("saved field 'clb' or 'fb' is not aligned as PxCLB/PxFB are")
        if not state.cmd & CMD_ST and (state.ci or state.sact):
            raise ValueError("saved field 'ci' or 'sact' holds commands of a stopped port "
                             "(stopping a port clears them, and a stopped one takes none)")
        return state


@attrs.define
class HbaState:
    """The generic host control registers the guest writes: GHC (AE and IE) and IS."""

    ghc: int
    irq_status: int

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, implemented: int) -> HbaState:
        check_fields(fields, attrs.fields_dict(cls))
        return cls(field_flags(fields, "ghc", 32, 0x80000002),
                   field_flags(fields, "irq_status", 32, implemented))


@attrs.define
class DiskState:
    """An ATA disk's settings (SET FEATURES, SET MULTIPLE) and its NCQ error log
    (page 10h; empty when no queued command has failed since it was read)."""

    multiple: int = 0
    mode_kind: int = 8
    mode: int = 6
    write_cache: bool = True
    look_ahead: bool = True
    ncq_log: bytes = b""

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> DiskState:
        check_fields(fields, attrs.fields_dict(cls))
        multiple = field_int(fields, "multiple", 8)
        if multiple & (multiple - 1) or multiple > 128:
            raise ValueError("saved field 'multiple' is not a power of two up to 128")
        log = field_bytes(fields, "ncq_log", max_size=512)
        if len(log) not in (0, 512):
            raise ValueError("saved field 'ncq_log' is neither empty nor one 512-byte page")
        return cls(multiple, *_mode(fields), _flag(fields, "write_cache"),
                   _flag(fields, "look_ahead"), log)


@attrs.define
class CdromState:
    """An ATAPI CD-ROM's sense data, medium lock and transfer mode."""

    sense_key: int = 0
    asc: int = 0
    ascq: int = 0
    locked: bool = False
    mode_kind: int = 8
    mode: int = 6

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> CdromState:
        check_fields(fields, attrs.fields_dict(cls))
        return cls(field_int(fields, "sense_key", 4), field_int(fields, "asc", 8),
                   field_int(fields, "ascq", 8), _flag(fields, "locked"), *_mode(fields))


def _mode(fields: Fields) -> tuple[int, int]:
    kind, mode = field_int(fields, "mode_kind", 8), field_int(fields, "mode", 3)
    if kind not in (0, 1, 4, 8):
        raise ValueError("saved field 'mode_kind' is not a transfer mode type")
    return kind, mode


def ports_from_fields(value: Any, implemented: int) -> dict[int, Fields]:
    """The saved ports, keyed by number, exactly those in ``implemented`` (PI)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("saved field 'ports' is not a mapping of port numbers")
    ports = {}
    for key, fields in value.items():
        if not key.isdigit() or int(key) >= MAX_PORTS or not isinstance(fields, dict):
            raise ValueError(f"saved port '{key}' is not a port number with its fields")
        ports[int(key)] = fields
    wanted = {i for i in range(MAX_PORTS) if implemented >> i & 1}
    if set(ports) != wanted:
        raise ValueError(f"saved ports {sorted(ports)} are not this controller's {sorted(wanted)}")
    return ports
