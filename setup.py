# SPDX-License-Identifier: BSD-2-Clause
"""setuptools has no pyproject key for cffi modules; this file only names the bindings."""

from setuptools import setup

setup(cffi_modules=["core/_kvm_build.py:ffibuilder", "core/_pages_build.py:ffibuilder",
                    "plugins/net/_slirp_build.py:ffibuilder",
                    "plugins/net/_netpath_build.py:ffibuilder",
                    "plugins/virtio/_vring_build.py:ffibuilder",
                    "plugins/virtio/_blkpath_build.py:ffibuilder",
                    "plugins/block/_uring_build.py:ffibuilder"])
