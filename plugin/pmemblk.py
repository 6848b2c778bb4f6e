#!/usr/sbin/nbdkit python
"""nbdkit plugin: a pmemblk target's region as an NBD export, over one-sided RDMA or TCP.

    nbdkit python plugin/pmemblk.py target=HOST:PORT|unix:PATH [transport=auto|verbs|tcp]
           [flush=auto|native|gpspm|apm] [readonly=true] [secret-file=PATH] ...

The checkout's entry point: the callbacks are pmemblk.nbdkit_plugin's (docs/nbdkit-plugin.md).
An installed pmemblk needs no path: ``pmemblk install-plugin``, then ``nbdkit pmemblk ...``.
"""

import os
import sys

try:
    import pmemblk  # noqa: F401
except ImportError:  # running from a checkout: the package sits beside plugin/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmemblk.nbdkit_plugin import *  # noqa: F403
