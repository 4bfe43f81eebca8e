"""Methods: one file per method.  The engine only knows the interface in :mod:`clcli.methods.base`."""

from clcli.methods.base import Batch, BuildContext, Method, ParamGroup, StepOutput

__all__ = ["Batch", "BuildContext", "Method", "ParamGroup", "StepOutput"]
