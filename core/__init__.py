# SPDX-License-Identifier: BSD-2-Clause
"""hvf: a plugin-based hypervisor framework on Linux KVM, modelled on bhyve."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hvf")
"""Marker for plugins' hook implementations: ``@hvf.hookimpl``."""

__all__ = ["__version__", "hookimpl"]
