# SPDX-License-Identifier: BSD-2-Clause
"""hvf's unit tests import the fake machine and the guest's accesses from here; they live
in :mod:`hvf.testing.fakes`, for device authors too."""

from hvf.testing.fakes import *  # noqa: F403
