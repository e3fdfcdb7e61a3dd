"""Modules and model surgery (imports core; never files or the console)."""

from .fuse import SharedInputGroup, find_shared_inputs, fuse_shared_inputs, input_sets, unfuse
from .inference import Prepared, bind_calls, prepare_for_inference, unprepare
from .linear import CompressedLinear, KernelRunner, materialized
from .surgery import build_empty, check_plan, compressed_modules, find_linears, set_submodule

__all__ = ["CompressedLinear", "KernelRunner", "materialized", "build_empty", "check_plan", "compressed_modules",
           "find_linears", "set_submodule", "SharedInputGroup", "find_shared_inputs", "fuse_shared_inputs", "input_sets", "unfuse",
           "Prepared", "bind_calls", "prepare_for_inference", "unprepare"]
