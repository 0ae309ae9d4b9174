"""oatui: a terminal workstation for Open-Assistant style RLHF."""

__version__ = "0.1.0"
