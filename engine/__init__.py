"""Orchestration of the FLD data engine: CLI, config, records, store, execution."""

import os

# An embedded Ray (no RAY_ADDRESS: a laptop, CI) must listen on loopback only. Ray reads
# this variable once, when it is imported, and otherwise binds every interface; so it is
# set here, before any engine module imports ray. Under `ray job submit` RAY_ADDRESS is
# set and the cluster's own addresses are used.
if "RAY_ADDRESS" not in os.environ:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
