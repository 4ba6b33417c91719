# SPDX-License-Identifier: BSD-2-Clause
"""What the controller says about itself: Identify data (NVMe 1.4 §5.15.2) and the log
pages (§5.14.1), built from the controller's :class:`Identity`.

As bhyve: PCI vendor 0xFB5D, the FreeBSD OUI, firmware "1.0" in one read-only slot,
one namespace (NSID 1) with one LBA format and no protection information, MDTS 9
(2 MiB with 4 KiB pages), ACL 2 and AERL 3 (three Aborts and four Asynchronous Event
Requests at once), no power-state changes. Unlike bhyve a volatile write cache is
reported unless the image is opened ``direct`` (O_SYNC): writes land in the host's page
cache until a Flush, so the host must be told to flush; Write Zeroes is offered and
done, and Doorbell Buffer Config (OACS bit 8) lets drivers skip doorbell writes.
"""

from __future__ import annotations

import struct

import attrs

from hvf.plugins.nvme.spec import IDENTIFY_SIZE, NSID, VERSION, WARNING_TEMPERATURE

VENDOR_ID = 0xFB5D
DEVICE_ID = 0x0A0A
MODEL = b"hvf-NVMe"
FIRMWARE = b"1.0"
OUI = 0x589CFC
#: Maximum data transfer: 2^MDTS minimum-size (4 KiB) pages.
MDTS = 9
MAX_TRANSFER = (1 << MDTS) * 4096
#: Aborts and Asynchronous Event Requests outstanding at once (Identify: 0-based).
ABORT_LIMIT = 3
ASYNC_EVENT_LIMIT = 4
#: Temperatures in kelvin: what the sensor reads, the warning and critical thresholds.
TEMPERATURE = 296
WARNING_TEMP = 0x157
CRITICAL_TEMP = 0x175

OACS_DOORBELL_BUFFER = 1 << 8
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
#: VWC: a volatile write cache, and Flush with NSID FFFFFFFFh supported.
VWC_PRESENT_AND_FLUSH_ALL = 0x07
#: LPA: extended data for Get Log Page (NUMDU, offsets).
LPA_EXTENDED = 1 << 2
NSFEAT_OPTPERF = 1 << 4
#: DLFEAT: Write Zeroes may deallocate (what deallocated blocks read is not promised:
#: a file system that cannot punch holes leaves the data).
DLFEAT_WRITE_ZEROES_DEALLOCATES = 1 << 3
NSATTR_WRITE_PROTECTED = 1 << 0
NIDT_EUI64 = 1

ERROR_LOG_SIZE = 64
SMART_LOG_SIZE = 512
FIRMWARE_LOG_SIZE = 512

_CONTROLLER_HEAD = struct.Struct("<HH20s40s8sB3sBBHI")


@attrs.frozen
class Identity:
    """The controller's and the namespace's fixed properties."""

    serial: bytes
    eui64: int
    blocks: int
    block_shift: int
    #: Logical blocks per physical block of the image (a power of two).
    blocks_per_physical: int
    dsm: bool
    write_cache: bool
    readonly: bool
    maxq: int
    qsz: int

    @property
    def block_size(self) -> int:
        return 1 << self.block_shift


def controller(identity: Identity) -> bytes:
    """Identify Controller (CNS 01h)."""
    data = bytearray(IDENTIFY_SIZE)
    _CONTROLLER_HEAD.pack_into(data, 0, VENDOR_ID, 0, identity.serial, MODEL.ljust(40),
                               FIRMWARE.ljust(8), 4, OUI.to_bytes(3, "little"), 0, MDTS,
                               0, VERSION)
    data[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<HBBBBBBBBHH", data, 256, OACS_DOORBELL_BUFFER, ABORT_LIMIT - 1,
                     ASYNC_EVENT_LIMIT - 1, 0x03,  # FRMW: one slot, read-only
                     LPA_EXTENDED, 0, 0, 0, 0, WARNING_TEMP, CRITICAL_TEMP)
    oncs = ONCS_WRITE_ZEROES | (ONCS_DSM if identity.dsm else 0)
    vwc = VWC_PRESENT_AND_FLUSH_ALL if identity.write_cache else 0
    struct.pack_into("<BBHIHHBB", data, 512, 0x66, 0x44, 0, 1, oncs, 0, 0, vwc)
    data[530] = 1  # NVSCC: vendor specific commands in the standard format
    nqn = b"nqn.2014-08.org.nvmexpress:fb5d0000" + identity.serial.strip() + b"-" + MODEL
    data[768 : 768 + len(nqn)] = nqn
    struct.pack_into("<H", data, 2048, 2500)  # power state 0: 25 W at most
    return bytes(data)


def namespace(identity: Identity) -> bytes:
    """Identify Namespace (CNS 00h) for NSID 1."""
    data = bytearray(IDENTIFY_SIZE)
    blocks = identity.blocks
    dlfeat = DLFEAT_WRITE_ZEROES_DEALLOCATES if identity.dsm else 0
    struct.pack_into("<QQQBBBBBBBBBB", data, 0, blocks, blocks, blocks, NSFEAT_OPTPERF, 0,
                     0, 0, 0, 0, 0, 0, 0, dlfeat)
    data[48:64] = (blocks << identity.block_shift).to_bytes(16, "little")  # NVMCAP
    granularity = identity.blocks_per_physical - 1
    struct.pack_into("<5H", data, 64, *[granularity] * 5)  # NPWG NPWA NPDG NPDA NOWS
    data[99] = NSATTR_WRITE_PROTECTED if identity.readonly else 0
    data[120:128] = identity.eui64.to_bytes(8, "big")
    struct.pack_into("<HBB", data, 128, 0, identity.block_shift, 0)  # LBA format 0
    return bytes(data)


def active_namespaces(after: int) -> bytes:
    """Active Namespace ID list (CNS 02h): the active NSIDs above ``after``."""
    data = bytearray(IDENTIFY_SIZE)
    if after < NSID:
        struct.pack_into("<I", data, 0, NSID)
    return bytes(data)


def descriptors(identity: Identity) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h): the EUI-64."""
    data = bytearray(IDENTIFY_SIZE)
    data[0:4] = bytes([NIDT_EUI64, 8, 0, 0])
    data[4:12] = identity.eui64.to_bytes(8, "big")
    return bytes(data)


@attrs.frozen
class Health:
    """What the SMART / Health Information log reports."""

    warnings: int
    bytes_read: int
    bytes_written: int
    reads: int
    writes: int
    media_errors: int
    power_on_hours: int


def _data_units(nbytes: int) -> int:
    """Thousands of 512-byte units, rounded up (§5.14.1.2)."""
    return (nbytes // 512 + 999) // 1000


def smart_log(health: Health) -> bytes:
    """SMART / Health Information (log 02h), for the whole controller."""
    data = bytearray(SMART_LOG_SIZE)
    struct.pack_into("<BHBBB", data, 0, health.warnings, TEMPERATURE, 100, 10, 0)
    for offset, value in ((32, _data_units(health.bytes_read)),
                          (48, _data_units(health.bytes_written)),
                          (64, health.reads), (80, health.writes), (112, 1),
                          (128, health.power_on_hours), (160, health.media_errors)):
        data[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(data)


def firmware_log() -> bytes:
    """Firmware Slot Information (log 03h): slot 1 active, holding :data:`FIRMWARE`."""
    data = bytearray(FIRMWARE_LOG_SIZE)
    data[0] = 1
    data[8:16] = FIRMWARE.ljust(8)
    return bytes(data)


def temperature_warning(over: int, under: int) -> int:
    """The SMART critical warning bits the thresholds set against :data:`TEMPERATURE`."""
    return WARNING_TEMPERATURE if TEMPERATURE >= over or TEMPERATURE <= under else 0
