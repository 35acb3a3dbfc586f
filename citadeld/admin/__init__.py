"""The admin socket and its commands (`citadelctl`). Import what you need to add a command::

    from citadeld.admin import AdminContext, AdminError, Param, command
"""

from citadeld.admin.protocol import AdminError
from citadeld.admin.registry import REGISTRY, AdminContext, Command, Param, command, register

__all__ = ["REGISTRY", "AdminContext", "AdminError", "Command", "Param", "command", "register"]
