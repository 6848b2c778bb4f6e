"""pmemblk: remote persistent memory as a Linux block device."""

__version__ = "0.2.0"
