# SPDX-License-Identifier: BSD-2-Clause
"""NVM Express 1.4 names the controller uses: registers, opcodes, status codes,
features and log pages (base specification §3, §4.6, §5, §6)."""

from __future__ import annotations

import struct
from typing import NamedTuple

PAGE = 4096
PAGE_SHIFT = 12
#: Submission and completion queue entry sizes (and their log2, CC.IOSQES/IOCQES).
SQE_SIZE, CQE_SIZE = 64, 16
SQES_LOG, CQES_LOG = 6, 4
#: The one namespace, and "every namespace".
NSID = 1
NSID_ALL = 0xFFFF_FFFF
VERSION = 0x0001_0400

# ---- controller registers (§3.1) ----
REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC = 0x00, 0x08, 0x0C, 0x10, 0x14
REG_CSTS, REG_NSSR, REG_AQA, REG_ASQ, REG_ACQ = 0x1C, 0x20, 0x24, 0x28, 0x30
REGISTERS_END = 0x40
DOORBELLS = 0x1000
#: Doorbell stride (CAP.DSTRD 0): each queue's SQ tail, then its CQ head, 4 bytes each.
DOORBELL_STRIDE = 4

CC_EN = 1 << 0
CC_WRITABLE = 0x00FF_FFF1
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
CAP_CQR = 1 << 16
CAP_CSS_NVM = 1 << 37
#: CAP.TO in 500 ms units: 30 s, as bhyve.
CAP_TIMEOUT = 60


def cc_field(cc: int, shift: int, bits: int) -> int:
    """A field of CC: CSS (4, 3), MPS (7, 4), AMS (11, 3), SHN (14, 2), IOSQES (16, 4),
    IOCQES (20, 4)."""
    return cc >> shift & ((1 << bits) - 1)


# ---- commands (§4.2, §5, §6) ----
SQE = struct.Struct("<BBHI8xQQQ6I")
CQE_HEAD = struct.Struct("<III")
CQE_STATUS = struct.Struct("<I")


class Command(NamedTuple):
    """A submission queue entry."""

    opcode: int
    flags: int  # FUSE (bits 1:0), PSDT (bits 7:6)
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def parse(cls, raw: bytes | memoryview) -> Command:
        return cls._make(SQE.unpack_from(raw))


ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY = 0x04, 0x05, 0x06
ADMIN_ABORT, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x08, 0x09, 0x0A
ADMIN_ASYNC_EVENT, ADMIN_FIRMWARE_COMMIT, ADMIN_FIRMWARE_DOWNLOAD = 0x0C, 0x10, 0x11
ADMIN_DOORBELL_BUFFER_CONFIG = 0x7C
IO_FLUSH, IO_WRITE, IO_READ, IO_WRITE_ZEROES, IO_DSM = 0x00, 0x01, 0x02, 0x08, 0x09

#: Read/Write/Write Zeroes CDW12: number of blocks (0-based), FUA, Write Zeroes DEAC.
NLB_MASK = 0xFFFF
RW_FUA = 1 << 30
WZ_DEAC = 1 << 25
#: Dataset Management CDW11 attribute: deallocate.
DSM_DEALLOCATE = 1 << 2
DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in blocks, starting LBA
DSM_MAX_RANGES = 256

# ---- status: the 15-bit status field of a completion (§4.6.1.2) ----
#: Do Not Retry.
DNR = 1 << 14
SUCCESS = 0x000
INVALID_OPCODE = DNR | 0x001
INVALID_FIELD = DNR | 0x002
DATA_TRANSFER_ERROR = 0x004
INTERNAL_ERROR = 0x006
ABORT_REQUESTED = 0x007
ABORTED_SQ_DELETION = 0x008
INVALID_NAMESPACE = DNR | 0x00B
COMMAND_SEQUENCE_ERROR = DNR | 0x00C
INVALID_PRP_OFFSET = DNR | 0x013
NAMESPACE_WRITE_PROTECTED = DNR | 0x020
LBA_OUT_OF_RANGE = DNR | 0x080
# command specific (status code type 1)
COMPLETION_QUEUE_INVALID = DNR | 0x100
INVALID_QUEUE_IDENTIFIER = DNR | 0x101
INVALID_QUEUE_SIZE = DNR | 0x102
ASYNC_EVENT_LIMIT_EXCEEDED = DNR | 0x105
INVALID_FIRMWARE_SLOT = DNR | 0x106
INVALID_INTERRUPT_VECTOR = DNR | 0x108
INVALID_LOG_PAGE = DNR | 0x109
INVALID_QUEUE_DELETION = DNR | 0x10C
FEATURE_NOT_SAVEABLE = DNR | 0x10D

# ---- identify (§5.15) ----
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NAMESPACES, CNS_DESCRIPTORS = 0x00, 0x01, 0x02, 0x03
IDENTIFY_SIZE = 4096

# ---- features (§5.21.1) ----
FEAT_ARBITRATION = 0x01
FEAT_POWER_MANAGEMENT = 0x02
FEAT_TEMPERATURE_THRESHOLD = 0x04
FEAT_ERROR_RECOVERY = 0x05
FEAT_VOLATILE_WRITE_CACHE = 0x06
FEAT_NUMBER_OF_QUEUES = 0x07
FEAT_INTERRUPT_COALESCING = 0x08
FEAT_INTERRUPT_VECTOR_CONFIG = 0x09
FEAT_WRITE_ATOMICITY = 0x0A
FEAT_ASYNC_EVENT_CONFIG = 0x0B
#: Get Features select: current, default, saved, supported capabilities.
SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
#: Set Features: save.
SET_SAVE = 1 << 31

# ---- log pages (§5.14.1) and asynchronous events (§5.2) ----
LOG_ERROR, LOG_SMART, LOG_FIRMWARE_SLOT = 0x01, 0x02, 0x03
#: Get Log Page CDW10: retain asynchronous event.
LOG_RAE = 1 << 15
EVENT_ERROR, EVENT_SMART = 0, 1
#: Error event information: a write to a doorbell of no queue, a doorbell value out of range.
EVENT_INVALID_DOORBELL, EVENT_INVALID_DOORBELL_VALUE = 0x00, 0x01
#: SMART event information: a temperature threshold was crossed.
EVENT_TEMPERATURE = 0x01
#: SMART critical warning bit (and Async Event Config bit) for temperature.
WARNING_TEMPERATURE = 1 << 1


def event(kind: int, info: int, log_page: int) -> int:
    """An asynchronous event's completion dword 0."""
    return kind | info << 8 | log_page << 16
