# SPDX-License-Identifier: BSD-2-Clause
"""State records of PCI functions, MSI-X, the reset control ports and virtio-console:
round trips, and every bad field refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvf.plugins.ahci.spec import CMD_ST, SIG_ATA
from hvf.plugins.ahci.state import PortState
from hvf.plugins.lpc.reset import PORT_A_A20, RCR_WRITABLE, ResetState
from hvf.plugins.pci.config_space import PciFunctionState
from hvf.plugins.pci.msix import MsixState
from hvf.plugins.virtio.console import ConsoleState


@given(config=st.binary(min_size=256, max_size=256),
       addresses=st.lists(st.integers(0, (1 << 64) - 1), min_size=6, max_size=6),
       level=st.booleans())
def test_pci_function_state_round_trips(config: bytes, addresses: list[int], level: bool) -> None:
    state = PciFunctionState(config, addresses, level)
    assert PciFunctionState.from_fields(state.to_fields()) == state


@pytest.mark.parametrize(("field", "value", "message"), [
    ("config", b"\0" * 255, "'config'"),
    ("config", "text", "'config'"),
    ("bar_addresses", [0] * 5, "BAR addresses are not a list of 6"),
    ("bar_addresses", [0, 0, 0, 0, 0, -1], "BAR addresses"),
    ("bar_addresses", [0, 0, 0, 0, 0, 1 << 64], "BAR addresses"),
    ("bar_addresses", None, "BAR addresses"),
    ("intx_level", 1, "'intx_level' is not a bool"),
    ("extra", 0, "'extra' is unknown"),
])
def test_pci_function_state_refuses_bad_fields(field: str, value: Any, message: str) -> None:
    fields = PciFunctionState(bytes(256), [0] * 6, False).to_fields()
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        PciFunctionState.from_fields(fields)


def test_pci_function_state_needs_every_field() -> None:
    fields = PciFunctionState(bytes(256), [0] * 6, False).to_fields()
    del fields["intx_level"]
    with pytest.raises(ValueError, match="intx_level"):
        PciFunctionState.from_fields(fields)


def test_reset_state() -> None:
    state = ResetState(rcr=RCR_WRITABLE, port_a=0)
    assert ResetState.from_fields(state.to_fields()) == state
    assert ResetState().port_a == PORT_A_A20  # A20 enabled after reset
    for field, value in (("rcr", 0x04), ("port_a", 0x01), ("rcr", 256)):
        fields = ResetState().to_fields()
        fields[field] = value
        with pytest.raises(ValueError, match=field):
            ResetState.from_fields(fields)


def test_msix_state() -> None:
    state = MsixState(bytes(3 * 16), bytes(8))
    assert MsixState.from_fields(state.to_fields(), 3) == state
    for field, value in (("table", bytes(16)), ("pending", bytes(7)), ("table", None)):
        fields = state.to_fields()
        fields[field] = value
        with pytest.raises(ValueError, match=field):
            MsixState.from_fields(fields, 3)


def test_console_state() -> None:
    message = bytes(8)
    state = ConsoleState([True, False], [message, message + b"name"])
    assert ConsoleState.from_fields(state.to_fields(), 2) == state
    for field, value in (("guest_open", [True]), ("guest_open", [1, 0]),
                         ("control_out", [b"short"]), ("control_out", ["text"]),
                         ("control_out", [bytes(5000)])):
        fields = state.to_fields()
        fields[field] = value
        with pytest.raises(ValueError, match=field):
            ConsoleState.from_fields(fields, 2)


@pytest.mark.parametrize("field", ["ci", "sact"])
def test_a_stopped_ahci_port_holds_no_commands(field: str) -> None:
    """Clearing PxCMD.ST clears PxCI and PxSACT, and a stopped port takes no command:
    a record saying otherwise is refused (found by test_ahci_fuzz)."""
    fields = PortState.initial(SIG_ATA).to_fields()
    with pytest.raises(ValueError, match="stopped port"):
        PortState.from_fields({**fields, field: 2})
    running = {**fields, "cmd": fields["cmd"] | CMD_ST, field: 2}
    assert getattr(PortState.from_fields(running), field) == 2
