"""Attribution methods behind one registry (see base.py for the protocol)."""
from .base import MethodContext, MethodSpec, ParamSpec, VolumeStats, all_methods, get_method, register

__all__ = ["MethodContext", "MethodSpec", "ParamSpec", "VolumeStats", "all_methods", "get_method", "register"]
