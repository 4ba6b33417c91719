# SPDX-License-Identifier: BSD-2-Clause
"""setuptools has no pyproject key for cffi modules; this file only names the binding."""

from setuptools import setup

setup(cffi_modules=["core/_kvm_build.py:ffibuilder"])
