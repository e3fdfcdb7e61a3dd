"""Modules and model surgery (imports core; never files or the console)."""

from .fuse import SharedInputGroup, find_shared_inputs, fuse_shared_inputs, unfuse
from .linear import CompressedLinear, materialized
from .surgery import build_empty, check_plan, compressed_modules, find_linears, set_submodule

__all__ = ["CompressedLinear", "materialized", "build_empty", "check_plan", "compressed_modules", "find_linears",
           "set_submodule", "SharedInputGroup", "find_shared_inputs", "fuse_shared_inputs", "unfuse"]
