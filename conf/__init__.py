"""Hydra configuration tree of dropbench, shipped in the wheel as ``dropbench.conf``."""
