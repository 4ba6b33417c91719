# SPDX-License-Identifier: BSD-2-Clause
"""Block back ends the disk front ends share: images (:mod:`.image`), their locks
(:mod:`.lock`), options (:mod:`.options`) and asynchronous I/O (:mod:`.backend`, on
worker threads or an io_uring, :mod:`.uring`; :mod:`.engine` picks)."""
