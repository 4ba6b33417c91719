# SPDX-License-Identifier: BSD-2-Clause
"""QEMU's firmware configuration interface (fw_cfg) on the LPC bus.

bhyve offers two flavours behind ``-l fwcfg,FLAVOUR``; hvf implements the ``qemu`` one,
the interface that SeaBIOS, OVMF and Linux's ``qemu_fw_cfg`` driver speak. The guest
sees a table of items, each named by a 16-bit key: a few well-known numeric keys
(signature, RAM size, CPU count, ...) and any number of named files, listed in a
directory item (key 0x19) from which the guest learns each file's key and size.

I/O ports (x86 layout):

``0x510-0x511`` (combined selector/data register)
    A 16-bit write selects an item and rewinds its read position. A byte read returns
    the next byte of the selected item, or 0 once past its end. The legacy byte-write
    path is ignored (QEMU has dropped it). Other access sizes read 0 and are ignored on
    write, which is how QEMU's own validity rules for this register behave.
``0x514-0x51B`` (DMA address, big-endian)
    A 32-bit write to offset 0 latches the high half of the address of an
    ``FWCfgDmaAccess`` descriptor; a 32-bit write to offset 4 supplies the low half
    and runs the transfer (a single 64-bit write to offset 0 does both). Reads return
    the signature ``"QEMU CFG"``.

The descriptor, in guest memory and big-endian, is ``{u32 control, u32 length,
u64 address}``. After the transfer the device stores 0 in ``control``, or the ERROR
bit if anything went wrong (descriptor or buffer outside guest RAM, a write to a
read-only item). Guest input never raises: every failure becomes the ERROR bit.

Other plugins add items with :meth:`FwCfg.add_file` / :meth:`FwCfg.add_item`. Data may
be a callable, evaluated each time the guest selects the item, so a table built from
the finished machine (the e820 map, ACPI tables) is computed only when asked for.

:func:`add_bootorder` gives SeaBIOS its ``bootorder`` file from the devices'
``bootindex`` (:mod:`hvf.bootorder`).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import attrs

from hvf.bootorder import bootorder_file
from hvf.device import Device
from hvf.errors import ConfigError, DeviceError, GuestMemoryError
from hvf.snapshot_api import Fields, check_fields, field_int

if TYPE_CHECKING:
    from hvf.config import Config
    from hvf.context import DeviceContext, Devices
    from hvf.vm import Machine

log = logging.getLogger("hvf.fwcfg")

#: Item contents: fixed bytes or a callable returning them when the item is selected.
ItemData: TypeAlias = bytes | bytearray | memoryview | Callable[[], bytes]

# ---- ports ----

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514
#: The combined selector/data register pair.
COMB_LENGTH = 2
#: The 64-bit DMA address register.
DMA_LENGTH = 8

# ---- well-known keys ----

KEY_SIGNATURE = 0x0000
KEY_ID = 0x0001
KEY_UUID = 0x0002
KEY_RAM_SIZE = 0x0003
KEY_NOGRAPHIC = 0x0004
KEY_NB_CPUS = 0x0005
KEY_BOOT_MENU = 0x000E
KEY_MAX_CPUS = 0x000F
KEY_FILE_DIR = 0x0019
#: Files get the keys from here up, in the order of their names.
KEY_FILE_FIRST = 0x0020
#: Bit 14 was once the write channel: it is ignored when an item is looked up.
KEY_WRITE_CHANNEL = 0x4000
#: Bit 15 marks architecture-specific items (0x8000 and up on x86).
KEY_ARCH_LOCAL = 0x8000
#: Index bits of a key (below the write-channel bit).
KEY_INDEX_MASK = 0x3FFF
#: The bits that name an item: everything but the write-channel bit.
_KEY_LOOKUP_MASK = 0xFFFF & ~KEY_WRITE_CHANNEL
#: How many files fit between KEY_FILE_FIRST and the write-channel bit.
MAX_FILES = KEY_WRITE_CHANNEL - KEY_FILE_FIRST

#: Contents of KEY_SIGNATURE.
SIGNATURE = b"QEMU"
#: What a read of the DMA address register returns (big-endian 0x51454d5520434647).
DMA_SIGNATURE = b"QEMU CFG"

#: KEY_ID feature bits.
ID_TRADITIONAL = 0x01
ID_DMA = 0x02

# ---- DMA descriptor ----

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
#: ``FWCfgDmaAccess``: control, length, address (big-endian).
DMA_ACCESS = struct.Struct(">IIQ")
_DMA_STATUS = struct.Struct(">I")

#: Directory entry: size, select, reserved, name (big-endian).
FILE_ENTRY = struct.Struct(">IHH56s")
#: A file name must leave room for its terminating NUL.
MAX_NAME_BYTES = FILE_ENTRY.size - 8 - 1

_ZERO_CHUNK = 1 << 20
_U32_MAX = 0xFFFF_FFFF


def _bswap32(value: int) -> int:
    return int.from_bytes((value & _U32_MAX).to_bytes(4, "little"), "big")


@attrs.define
class FwCfgState:
    """The selected key, the read position in its item, the latched DMA high half."""

    selector: int = 0
    offset: int = 0
    dma_high: int = 0

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> FwCfgState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field out of range."""
        check_fields(fields, attrs.fields_dict(cls))
        return cls(field_int(fields, "selector", 16), field_int(fields, "offset", 32),
                   field_int(fields, "dma_high", 32))


class FwCfg(Device):
    """The fw_cfg device: a keyed table of items read through ports or DMA.

    The guest-visible state is :attr:`state` (a :class:`FwCfgState`); the selected
    item's contents are evaluated from it on selection and on restore.
    """

    def __init__(self, name: str = "fwcfg") -> None:
        super().__init__(name)
        #: Numeric items by key (write-channel bit cleared).
        self._items: dict[int, ItemData] = {KEY_FILE_DIR: self._directory}
        #: Files by name; their keys follow the byte order of the names.
        self._files: dict[str, ItemData] = {}
        self._sorted_names: list[str] | None = []
        self._ctx: DeviceContext | None = None
        self.state = FwCfgState()
        #: Contents of the selected item, evaluated when it was selected.
        self._data = b""
        #: Serialises selection and DMA transfers between vCPUs (data reads need none).
        self._lock = threading.Lock()

    # ---- building ----

    def attach(self, ctx: DeviceContext) -> None:
        if self._ctx is not None:
            raise DeviceError(f"{self.name}: already attached")
        self._ctx = ctx
        ncpus = int(ctx.ncpus)
        standard: dict[int, bytes] = {
            KEY_SIGNATURE: SIGNATURE,
            KEY_ID: (ID_TRADITIONAL | ID_DMA).to_bytes(4, "little"),
            KEY_UUID: _uuid_bytes(ctx.machine_config.get("uuid")),
            KEY_RAM_SIZE: int(ctx.memory.size).to_bytes(8, "little"),
            KEY_NOGRAPHIC: (1).to_bytes(2, "little"),
            KEY_NB_CPUS: ncpus.to_bytes(2, "little"),
            KEY_BOOT_MENU: (0).to_bytes(2, "little"),
            KEY_MAX_CPUS: ncpus.to_bytes(2, "little"),
        }
        for key, data in standard.items():
            # An item a plugin set before attach (say, BOOT_MENU) wins over the default.
            self._items.setdefault(key, data)
        ctx.pio.register(
            SELECTOR_PORT, COMB_LENGTH, self.name, read=self._comb_read, write=self._comb_write
        )
        ctx.pio.register(DMA_PORT, DMA_LENGTH, self.name, read=self._dma_read,
                         write=self._dma_write)
        self._data = self._lookup(self.state.selector)

    def add_file(self, name: str, data: ItemData) -> None:
        """Add the file ``name`` (at most 55 bytes of UTF-8); a name used twice is refused.

        ``data`` is bytes, or a callable returning bytes that is called each time the
        guest selects the file (and when it reads the directory, for the size); its
        result should not change size once the guest is running.
        """
        if not isinstance(name, str) or not name:
            raise DeviceError(f"{self.name}: a fw_cfg file needs a non-empty name")
        encoded = name.encode("utf-8", "surrogateescape")
        if b"\0" in encoded:
            raise DeviceError(f"{self.name}: fw_cfg file name {name!r} contains a NUL byte")
        if len(encoded) > MAX_NAME_BYTES:
            raise DeviceError(
                f"{self.name}: fw_cfg file name '{name}' is {len(encoded)} bytes long; "
                f"at most {MAX_NAME_BYTES} fit"
            )
        if name in self._files:
            raise DeviceError(f"{self.name}: fw_cfg file '{name}' already exists")
        if len(self._files) >= MAX_FILES:
            raise DeviceError(f"{self.name}: no room for fw_cfg file '{name}' ({MAX_FILES} max)")
        self._files[name] = _check_data(self.name, f"file '{name}'", data)
        self._sorted_names = None

    def add_item(self, key: int, data: ItemData, *, replace: bool = False) -> None:
        """Set the numeric item ``key`` (below 0x20, or 0x8000 and up for x86 items).

        A key that already holds an item is refused unless ``replace`` is true; the
        standard items computed by :meth:`attach` can be replaced that way (or set
        beforehand, in which case attach keeps them).
        """
        if not isinstance(key, int) or not 0 <= key <= 0xFFFF or key & KEY_WRITE_CHANNEL:
            raise DeviceError(f"{self.name}: fw_cfg key {key!r} is not a valid item key")
        if key == KEY_FILE_DIR or (
            not (key & KEY_ARCH_LOCAL) and (key & KEY_INDEX_MASK) >= KEY_FILE_FIRST
        ):
            raise DeviceError(
                f"{self.name}: fw_cfg key {key:#06x} belongs to the file directory; use add_file()"
            )
        if key in self._items and not replace:
            raise DeviceError(f"{self.name}: fw_cfg key {key:#06x} already holds an item")
        self._items[key] = _check_data(self.name, f"item {key:#06x}", data)

    def file_names(self) -> list[str]:
        """The names of the files, in directory (selector) order."""
        return list(self._names())

    def file_selector(self, name: str) -> int:
        """The key the guest selects ``name`` with (valid until another file is added)."""
        try:
            return KEY_FILE_FIRST + self._names().index(name)
        except ValueError:
            raise DeviceError(f"{self.name}: no fw_cfg file '{name}'") from None

    # ---- item table ----

    def _names(self) -> list[str]:
        names = self._sorted_names
        if names is None:
            names = sorted(self._files, key=lambda n: n.encode("utf-8", "surrogateescape"))
            self._sorted_names = names
        return names

    def _lookup(self, key: int) -> bytes:
        """The current contents of the item ``key`` (empty for a key holding none)."""
        key &= _KEY_LOOKUP_MASK
        if KEY_FILE_FIRST <= key < KEY_WRITE_CHANNEL:
            names = self._names()
            index = key - KEY_FILE_FIRST
            if index >= len(names):
                return b""
            name = names[index]
            return _evaluate(self.name, f"file '{name}'", self._files[name])
        item = self._items.get(key)
        if item is None:
            return b""
        return _evaluate(self.name, f"item {key:#06x}", item)

    def _directory(self) -> bytes:
        names = self._names()
        parts = [len(names).to_bytes(4, "big")]
        for index, name in enumerate(names):
            size = len(_evaluate(self.name, f"file '{name}'", self._files[name]))
            parts.append(
                FILE_ENTRY.pack(
                    size & _U32_MAX,
                    KEY_FILE_FIRST + index,
                    0,
                    name.encode("utf-8", "surrogateescape"),
                )
            )
        return b"".join(parts)

    def _select(self, key: int) -> None:
        key &= 0xFFFF
        data = self._lookup(key)
        self.state.selector = key
        self.state.offset = 0
        self._data = data

    # ---- port handlers (per access: keep cheap) ----

    def _comb_read(self, offset: int, size: int) -> int:
        if size != 1:
            return 0
        data = self._data
        state = self.state
        pos = state.offset
        if pos < len(data):
            state.offset = pos + 1
            return data[pos]
        return 0

    def _comb_write(self, offset: int, size: int, value: int) -> None:
        if size == 2:
            with self._lock:
                self._select(value)
        # Byte writes were the legacy write path, which QEMU has removed: ignored.

    def _dma_read(self, offset: int, size: int) -> int:
        # The register is big-endian: byte i of the signature sits at port 0x514 + i.
        return int.from_bytes(DMA_SIGNATURE[offset : offset + size], "little")

    def _dma_write(self, offset: int, size: int, value: int) -> None:
        state = self.state
        if size == 4:
            if offset == 0:
                state.dma_high = _bswap32(value)
            elif offset == 4:
                address = (state.dma_high << 32) | _bswap32(value)
                state.dma_high = 0  # as in QEMU: the address resets after each transfer
                self._dma_transfer(address)
        elif size == 8 and offset == 0:
            state.dma_high = 0
            address = int.from_bytes((value & (1 << 64) - 1).to_bytes(8, "little"), "big")
            self._dma_transfer(address)

    # ---- DMA ----

    def _dma_transfer(self, desc: int) -> None:
        assert self._ctx is not None
        memory = self._ctx.memory
        with self._lock:
            try:
                control, length, address = DMA_ACCESS.unpack(memory.read(desc, DMA_ACCESS.size))
            except GuestMemoryError:
                status = DMA_CTL_ERROR
            else:
                status = self._dma_run(memory, control, length, address)
            # A descriptor outside RAM leaves nowhere to report the error.
            with contextlib.suppress(GuestMemoryError):
                memory.write(desc, _DMA_STATUS.pack(status))

    def _dma_run(self, memory: Any, control: int, length: int, address: int) -> int:
        """Carry out one descriptor; returns the control word to store back."""
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        if control & DMA_CTL_READ:
            op = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            op = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            op = DMA_CTL_SKIP
        else:
            return 0
        if not length:
            return 0
        data = self._data
        pos = self.state.offset
        count = min(length, max(len(data) - pos, 0))
        if count:
            # The part the item covers. As in QEMU the position moves on even when the
            # guest buffer is bad, and the transfer stops at the first error.
            failed = False
            if op == DMA_CTL_READ:
                if memory.contains(address, count):
                    memory.write(address, memoryview(data)[pos : pos + count])
                else:
                    failed = True
            elif op == DMA_CTL_WRITE:
                failed = True  # no item is writable
            self.state.offset = pos + count
            if failed:
                return DMA_CTL_ERROR
            address += count
            length -= count
        if length:
            # Past the end of the item: reads are zero-filled, skips do nothing.
            if op == DMA_CTL_READ:
                if not memory.contains(address, length):
                    return DMA_CTL_ERROR
                _zero_fill(memory, address, length)
            elif op == DMA_CTL_WRITE:
                return DMA_CTL_ERROR
        return 0

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return self.state.to_fields()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        state = FwCfgState.from_fields(fields)
        with self._lock:
            self._data = self._lookup(state.selector)
            self.state = state


def _check_data(owner: str, what: str, data: object) -> ItemData:
    if isinstance(data, (bytes, bytearray, memoryview)):
        fixed = bytes(data)
        if len(fixed) > _U32_MAX:
            raise DeviceError(f"{owner}: fw_cfg {what} is larger than 4 GiB")
        return fixed
    if callable(data):
        # What the callable returns is checked each time it is called.
        return cast("Callable[[], bytes]", data)
    raise DeviceError(
        f"{owner}: fw_cfg {what} must be bytes or a callable returning bytes, "
        f"not {type(data).__name__}"
    )


def _evaluate(owner: str, what: str, item: ItemData) -> bytes:
    if isinstance(item, bytes):
        return item
    assert callable(item)
    try:
        data = item()
    except Exception as e:
        raise DeviceError(f"{owner}: building fw_cfg {what} failed: {e}") from e
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DeviceError(f"{owner}: fw_cfg {what} produced {type(data).__name__}, not bytes")
    return bytes(data)


def _zero_fill(memory: Any, address: int, length: int) -> None:
    view = memory.slice(address, length)
    zeros = bytes(min(length, _ZERO_CHUNK))
    for start in range(0, length, _ZERO_CHUNK):
        end = min(start + _ZERO_CHUNK, length)
        view[start:end] = zeros[: end - start]


def _uuid_bytes(text: str | None) -> bytes:
    """The 16 bytes of ``text`` in RFC 4122 (big-endian) order; zeros when absent."""
    if not text:
        return bytes(16)
    import uuid  # only for a configured UUID: uuid loads libuuid

    try:
        return uuid.UUID(text).bytes
    except ValueError:
        log.warning("fwcfg: uuid '%s' does not parse; the guest sees a zero UUID", text)
        return bytes(16)


# ---- plugin glue ----


def parse(conf: list[str]) -> dict[str, str]:
    """Parse the options of ``-l fwcfg[,qemu]`` into the config node ``lpc.fwcfg``."""
    if not conf:
        return {"fwcfg": "qemu"}
    flavour = conf[0]
    if len(conf) > 1:
        raise ConfigError(f"fwcfg: unexpected option(s) '{','.join(conf[1:])}' after '{flavour}'")
    if flavour == "qemu":
        return {"fwcfg": "qemu"}
    raise ConfigError(_flavour_error(flavour))


def _flavour_error(flavour: str) -> str:
    if flavour == "bhyve":
        return (
            "fwcfg: the 'bhyve' flavour is not supported: hvf implements only QEMU's "
            "fw_cfg interface (use -l fwcfg,qemu)"
        )
    return f"fwcfg: unknown flavour '{flavour}': hvf implements only 'qemu'"


def create(vm: Machine, config: Config | None = None, name: str = "fwcfg") -> FwCfg | None:
    """Build the device when ``lpc.fwcfg`` is ``qemu``; None when it is not set.

    Any other value is refused (a config file may set it without going through
    :func:`parse`).
    """
    flavour = vm.config.get("lpc.fwcfg")
    if flavour is None:
        return None
    if flavour != "qemu":
        raise ConfigError(_flavour_error(flavour))
    return FwCfg(name)


#: SeaBIOS's boot order: device paths, one a line, the first tried first.
BOOTORDER_FILE = "bootorder"


def add_bootorder(device: FwCfg, where: Devices) -> None:
    """Add the ``bootorder`` file built from every device's
    :meth:`~hvf.device.Device.boot_entries` (none when no device has a ``bootindex``);
    ``ConfigError`` when two devices share an index."""
    data = bootorder_file(entry for other in where.devices for entry in other.boot_entries())
    if data:
        device.add_file(BOOTORDER_FILE, data)


def find(where: Devices) -> FwCfg | None:
    """The machine's fw_cfg device (looked up on a machine or a device's context), for
    plugins that add files to it."""
    for device in where.devices:
        if isinstance(device, FwCfg):
            return device
    return None
