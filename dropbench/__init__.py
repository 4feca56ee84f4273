"""dropbench: regularization ablations (dropout, R-Drop, DropConnect & co.) from Hydra configs."""

__version__ = "0.4.0.dev0"
