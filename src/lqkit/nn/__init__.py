"""Modules and model surgery (imports core; never files or the console)."""

from .linear import CompressedLinear
from .surgery import build_empty, check_plan, compressed_modules, find_linears, set_submodule

__all__ = ["CompressedLinear", "build_empty", "check_plan", "compressed_modules", "find_linears", "set_submodule"]
